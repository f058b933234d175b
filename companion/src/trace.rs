//! The W3C trace context a request arrived with, for log correlation: the filter
//! forwards the `traceparent` of the request whose lookup this is, so the store's and
//! the REST front's log lines can name the trace. Only the trace id of a well-formed
//! header is kept; nothing a client could shape freely reaches a log.

use axum::http::HeaderMap;

/// The 32-hex trace id of a valid version-00 `traceparent`, or `None`
/// ([`ibex_wire::traceparent_trace_id`], as the filter reads it).
pub fn trace_id(headers: &HeaderMap) -> Option<&str> {
    ibex_wire::traceparent_trace_id(headers.get("traceparent")?.to_str().ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("traceparent", value.parse().unwrap());
        h
    }

    #[test]
    fn reads_only_well_formed_trace_contexts() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(
            trace_id(&with(good)),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        for bad in [
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01 x",
        ] {
            assert_eq!(trace_id(&with(bad)), None, "{bad}");
        }
        assert_eq!(trace_id(&HeaderMap::new()), None);
    }
}
