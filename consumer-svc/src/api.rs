//! The `omnibus.consumer.v1.ConsumerService` gRPC edge.

use std::sync::Arc;

use omnibus_proto::consumer::v1::consumer_service_server::ConsumerService;
use omnibus_proto::consumer::v1::{GetConsumerStatusRequest, GetConsumerStatusResponse};
use tonic::{Request, Response, Status};

use crate::broker::BrokerStatus;

pub struct ConsumerApi {
    broker: Arc<BrokerStatus>,
}

impl ConsumerApi {
    pub fn new(broker: Arc<BrokerStatus>) -> Self {
        Self { broker }
    }
}

#[tonic::async_trait]
impl ConsumerService for ConsumerApi {
    async fn get_consumer_status(
        &self,
        _request: Request<GetConsumerStatusRequest>,
    ) -> Result<Response<GetConsumerStatusResponse>, Status> {
        Ok(Response::new(GetConsumerStatusResponse {
            connected: self.broker.connected(),
            events_processed: 0,
            last_event_time: None,
            status: None,
        }))
    }
}
