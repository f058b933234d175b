//! The one type that carries directive text through the companion.
//!
//! It exists so that content can never reach a log line by accident: it has no
//! `Display`, its `Debug` prints only the length (it is an
//! [`ibex_wire::Redacted`]), and the only way to read the text is the explicit
//! [`DirectiveText::expose`].

use std::sync::Arc;

use ibex_wire::Redacted;

/// Directive content (a system prompt). Cheap to clone; redacted in `Debug`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectiveText(Redacted<Arc<str>>);

impl DirectiveText {
    /// Wraps text read from Postgres or from an operator.
    pub fn new(text: impl Into<Arc<str>>) -> Self {
        Self(Redacted::new(text.into()))
    }

    /// The raw text. Callers must send it only to Postgres or to an HTTP
    /// response body, never to a logger.
    pub fn expose(&self) -> &str {
        self.0.expose()
    }

    /// Length in bytes; safe to log.
    pub fn len(&self) -> usize {
        self.expose().len()
    }

    /// True for the empty string.
    pub fn is_empty(&self) -> bool {
        self.expose().is_empty()
    }
}

impl serde::Serialize for DirectiveText {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.expose())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_redacts_content() {
        let t = DirectiveText::new("top secret prompt");
        let dbg = format!("{t:?} {:?}", Some(t.clone()));
        assert!(!dbg.contains("secret"), "{dbg}");
        assert!(dbg.contains("17 bytes"));
    }

    #[test]
    fn serializes_as_plain_string() {
        let t = DirectiveText::new("a \"quoted\" line\n");
        assert_eq!(
            serde_json::to_string(&t).unwrap(),
            r#""a \"quoted\" line\n""#
        );
    }
}
