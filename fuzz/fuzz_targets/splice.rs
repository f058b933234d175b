//! Fuzzes the JSON scanner and splicer with arbitrary bodies and directives.
//!
//! Properties: never panics; whatever it accepts comes out as valid JSON that differs
//! from the input only by inserted bytes (or a replaced `null`); and it accepts a body
//! only if a reference JSON parser (serde_json) does too.
#![no_main]

use ibex_directive::escape::escape_json_str;
use ibex_directive::inject::{splice, Format};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // First byte picks the format, up to the first NUL is the directive, the rest the body.
    let Some((&selector, rest)) = data.split_first() else { return };
    let format = match selector % 3 {
        0 => Format::OpenAiChat,
        1 => Format::OpenAiResponses,
        _ => Format::AnthropicMessages,
    };
    let (directive, body) = match rest.iter().position(|&b| b == 0) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (&b""[..], rest),
    };
    let directive = String::from_utf8_lossy(directive);
    let escaped = escape_json_str(&directive);
    if let Ok(out) = splice(format, body, r#"{"role":"system","content":""#, &escaped) {
        let reference = serde_json::from_slice::<serde_json::Value>(body);
        // serde_json rejects lone surrogate escapes that the scanner deliberately allows.
        let lone_surrogate = std::str::from_utf8(body).map_or(false, |s| s.contains("\\ud") || s.contains("\\uD"));
        assert!(reference.is_ok() || lone_surrogate, "accepted a body the reference refuses");
        if !lone_surrogate {
            serde_json::from_slice::<serde_json::Value>(&out).expect("output must be JSON");
        }
        let prefix = body.iter().zip(&out).take_while(|(a, b)| a == b).count();
        let suffix = body[prefix..].iter().rev().zip(out.iter().rev()).take_while(|(a, b)| a == b).count();
        let changed = body.len() - prefix - suffix;
        assert!(changed == 0 || &body[prefix..prefix + changed] == &b"null"[..changed], "bytes outside the insertion changed");
    }
});
