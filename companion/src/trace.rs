//! The W3C trace context a request arrived with, for log correlation: the filter
//! forwards the `traceparent` of the request whose lookup this is, so the store's and
//! the REST front's log lines can name the trace. Only the trace id of a well-formed
//! header is kept; nothing a client could shape freely reaches a log.

use axum::http::HeaderMap;

/// The 32-hex trace id of a valid version-00 `traceparent`, or `None`.
pub fn trace_id(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get("traceparent")?.to_str().ok()?;
    let b = value.as_bytes();
    let hex = |s: &[u8]| {
        s.iter()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
    };
    let nonzero = |s: &[u8]| s.iter().any(|&c| c != b'0');
    let ok = b.len() == 55
        && b.starts_with(b"00-")
        && b.get(35) == Some(&b'-')
        && b.get(52) == Some(&b'-')
        && b.get(3..35).is_some_and(|t| hex(t) && nonzero(t))
        && b.get(36..52).is_some_and(|p| hex(p) && nonzero(p))
        && b.get(53..55).is_some_and(hex);
    ok.then(|| value.get(3..35)).flatten()
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
