//! The `omnibus.db.v1.DatabaseService` gRPC edge. RPCs not implemented yet answer
//! UNIMPLEMENTED (generated default stubs).

use omnibus_proto::db::v1::database_service_server::DatabaseService;
use sqlx::PgPool;

pub struct DatabaseApi {
    #[allow(dead_code)] // used by the CRUD RPCs
    pool: PgPool,
}

impl DatabaseApi {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

#[tonic::async_trait]
impl DatabaseService for DatabaseApi {}
