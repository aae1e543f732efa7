//! Trace context: a caller's W3C `traceparent` becomes the parent of db-svc's request span,
//! exported over OTLP/gRPC to a collector (here an in-process one that records what it gets).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use omnibus_proto::db::v1 as pb;
use omnibus_proto::db::v1::database_service_client::DatabaseServiceClient;
use omnibus_tests::{ServiceSpec, TestDatabase};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;

/// (service.name, span name, trace id hex, parent span id hex) of every span received.
type Received = Arc<Mutex<Vec<(String, String, String, String)>>>;

struct Collector(Received);

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = self.0.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref()?.value.as_ref())
                .map(|v| match v {
                    Value::StringValue(s) => s.clone(),
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    received.push((
                        service.clone(),
                        span.name.clone(),
                        hex(&span.trace_id),
                        hex(&span.parent_span_id),
                    ));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tokio::test]
async fn traceparent_parents_the_exported_request_span() {
    let received: Received = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector_addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Collector(received.clone())))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let db = TestDatabase::create().await.unwrap();
    let mut svc = ServiceSpec::new("db-svc")
        .env("DATABASE_URL", &db.url)
        .env(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            format!("http://{collector_addr}"),
        )
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .args(["--shutdown-grace", "2s"])
        .spawn()
        .unwrap();
    svc.wait_serving().await.unwrap();

    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    let parent_id = &uuid::Uuid::new_v4().simple().to_string()[..16];
    let mut request = tonic::Request::new(pb::CountRequest {
        table: "agent_actions".into(),
        ..Default::default()
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{parent_id}-01").parse().unwrap(),
    );
    DatabaseServiceClient::new(svc.channel())
        .count(request)
        .await
        .expect("count");

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let found = received
            .lock()
            .unwrap()
            .iter()
            .find(|s| s.2 == trace_id)
            .cloned();
        if let Some((service, name, _, parent)) = found {
            assert_eq!(service, "db-svc");
            assert_eq!(name, "omnibus.db.v1.DatabaseService/Count");
            assert_eq!(parent, parent_id, "the caller's span is the parent");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no span of trace {trace_id} exported; got {:?}\n{}",
            received.lock().unwrap(),
            svc.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
