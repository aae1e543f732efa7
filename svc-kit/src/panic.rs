//! Panics (bugs) turned into values, so that each place that contains one - a gRPC call, a bus
//! request, a streamed query - can answer for it instead of dying silently.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;

use futures::FutureExt;

/// The text a panic was raised with (`panic!("...")`), for the log.
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_string())
}

/// Runs `work`; a panic inside it becomes `Err` with the panic's text. The caller answers for
/// it (the work's state is unknown and must not be used again).
pub async fn catch_panic<F: Future>(work: F) -> Result<F::Output, String> {
    AssertUnwindSafe(work)
        .catch_unwind()
        .await
        .map_err(|panic| panic_message(&*panic))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_becomes_its_message() {
        assert_eq!(catch_panic(async { 7 }).await, Ok(7));
        let text = catch_panic(async {
            if true {
                panic!("bug {}", 42);
            }
        })
        .await;
        assert_eq!(text, Err("bug 42".to_string()));
        let fixed = catch_panic(async {
            if true {
                panic!("fixed text");
            }
        })
        .await;
        assert_eq!(fixed, Err("fixed text".to_string()));
    }
}
