//! W3C Trace Context (`traceparent`) from gRPC metadata into `tracing` spans, so every log line
//! of a request carries the caller's trace id (or a fresh one when the caller sent none).

/// A parsed `traceparent` header: `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: String,
    pub parent_id: String,
    pub sampled: bool,
}

fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl TraceParent {
    /// Parses a header value per the W3C spec (version 00, and later versions' first four
    /// fields); all-zero ids and malformed values are `None`.
    pub fn parse(raw: &str) -> Option<Self> {
        let mut parts = raw.trim().split('-');
        let version = parts.next()?;
        let trace_id = parts.next()?;
        let parent_id = parts.next()?;
        let flags = parts.next()?;
        if !is_lower_hex(version, 2) || version == "ff" {
            return None;
        }
        if version == "00" && parts.next().is_some() {
            return None;
        }
        if !is_lower_hex(trace_id, 32) || trace_id.bytes().all(|b| b == b'0') {
            return None;
        }
        if !is_lower_hex(parent_id, 16) || parent_id.bytes().all(|b| b == b'0') {
            return None;
        }
        if !is_lower_hex(flags, 2) {
            return None;
        }
        let flags = u8::from_str_radix(flags, 16).ok()?;
        Some(Self {
            trace_id: trace_id.to_string(),
            parent_id: parent_id.to_string(),
            sampled: flags & 1 == 1,
        })
    }
}

/// A random 128-bit trace id in W3C form, for requests that arrive without one.
pub fn new_trace_id() -> String {
    format!("{:032x}", rand::random::<u128>().max(1))
}

/// A random 64-bit span id in W3C form.
pub fn new_span_id() -> String {
    format!("{:016x}", rand::random::<u64>().max(1))
}

/// A `traceparent` value for a new span in `trace_id` (sampled).
pub fn child_traceparent(trace_id: &str) -> String {
    format!("00-{trace_id}-{}-01", new_span_id())
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl opentelemetry::propagation::Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// The span a gRPC request runs in: `rpc.service`, `rpc.method`, `trace_id` and, when the
/// caller sent a `traceparent`, `parent_span_id`. With OTLP export on, the exported span is a
/// child of the caller's span and `trace_id` is its trace id.
pub fn request_span(headers: &http::HeaderMap, service: &str, method: &str) -> tracing::Span {
    use tracing::field::{Empty, display};
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    let span = tracing::info_span!(
        "grpc",
        otel.name = %format_args!("{service}/{method}"),
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = method,
        trace_id = Empty,
        parent_span_id = Empty,
    );
    let parent = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(TraceParent::parse);
    if let Some(p) = &parent {
        span.record("parent_span_id", display(&p.parent_id));
    }
    if crate::telemetry::otel_enabled() {
        use opentelemetry::trace::TraceContextExt;
        let cx = opentelemetry::global::get_text_map_propagator(|propagator| {
            propagator.extract(&HeaderExtractor(headers))
        });
        let _ = span.set_parent(cx);
        let id = span.context().span().span_context().trace_id();
        if id != opentelemetry::trace::TraceId::INVALID {
            span.record("trace_id", display(id));
            return span;
        }
    }
    match parent {
        Some(p) => span.record("trace_id", display(p.trace_id)),
        None => span.record("trace_id", display(new_trace_id())),
    };
    span
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_w3c_examples() {
        let p =
            TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(p.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(p.parent_id, "00f067aa0ba902b7");
        assert!(p.sampled);
        // A future version may append fields.
        assert!(
            TraceParent::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-x")
                .is_some()
        );
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad}");
        }
        let id = new_trace_id();
        assert!(is_lower_hex(&id, 32), "{id}");
    }
}
