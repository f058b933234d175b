//! The field-by-field reader under [`Config::parse`](super::Config::parse): a JSON
//! object read one named field at a time, each with its type, default and range, so
//! that every refusal names its field (`cache.ttl_seconds`) and any field left over
//! is refused as unknown; plus the checks of the string fields that go into headers
//! and URLs. The path tables are read by `paths`, with [`Section::take`].
//!
//! It knows JSON and field paths, not what the fields mean: the defaults and the
//! [`Config`](super::Config) they build are in the parent module. It must never touch
//! proxy-wasm. Errors quote the value only for names (choices, header, cluster and
//! format names), never for a free-form field: a secret such as `control.token` is
//! read with [`Section::opt_string`], whose errors name only the type.

use serde_json::{Map, Value};

use super::ConfigError;

/// The refusal of `field` (a dotted path, `<root>`, or an environment variable).
pub(super) fn err(field: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.to_string(),
        reason: reason.into(),
    }
}

/// Reads the fields of one JSON object, remembering which were consumed so that any
/// field left over is reported as unknown.
pub(super) struct Section<'a> {
    path: &'a str,
    map: Map<String, Value>,
}

impl<'a> Section<'a> {
    pub(super) fn new(path: &'a str, value: Value) -> Result<Self, ConfigError> {
        match value {
            Value::Object(map) => Ok(Section { path, map }),
            other => Err(err(
                if path.is_empty() { "<root>" } else { path },
                format!("expected an object, got {}", type_name(&other)),
            )),
        }
    }

    pub(super) fn field_path(&self, name: &str) -> String {
        if self.path.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.path, name)
        }
    }

    /// Takes a field out; JSON `null` counts as absent so a default applies. For
    /// fields of a shape the typed readers below do not cover (`inject.paths`).
    pub(super) fn take(&mut self, name: &str) -> Option<Value> {
        match self.map.remove(name) {
            Some(Value::Null) | None => None,
            Some(v) => Some(v),
        }
    }

    pub(super) fn string(&mut self, name: &str, default: &str) -> Result<String, ConfigError> {
        match self.take(name) {
            None => Ok(default.to_string()),
            Some(Value::String(s)) => Ok(s),
            Some(other) => Err(err(
                &self.field_path(name),
                format!("expected a string, got {}", type_name(&other)),
            )),
        }
    }

    pub(super) fn opt_string(&mut self, name: &str) -> Result<Option<String>, ConfigError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(err(
                &self.field_path(name),
                format!("expected a string, got {}", type_name(&other)),
            )),
        }
    }

    pub(super) fn boolean(&mut self, name: &str, default: bool) -> Result<bool, ConfigError> {
        match self.take(name) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(b),
            Some(other) => Err(err(
                &self.field_path(name),
                format!("expected true or false, got {}", type_name(&other)),
            )),
        }
    }

    pub(super) fn integer(
        &mut self,
        name: &str,
        default: u64,
        min: u64,
        max: u64,
    ) -> Result<u64, ConfigError> {
        let value = match self.take(name) {
            None => return Ok(default),
            Some(v) => v,
        };
        let n = value.as_u64().ok_or_else(|| {
            err(
                &self.field_path(name),
                format!("expected a non-negative integer, got {}", describe(&value)),
            )
        })?;
        if n < min || n > max {
            return Err(err(
                &self.field_path(name),
                format!("must be between {min} and {max}, got {n}"),
            ));
        }
        Ok(n)
    }

    /// A nested object; absent means an empty one, so its defaults apply.
    pub(super) fn section(&mut self, name: &'a str) -> Result<Section<'a>, ConfigError> {
        let value = self.take(name).unwrap_or(Value::Object(Map::new()));
        Section::new(name, value)
    }

    /// Fails if any field was not consumed: unknown fields are refused, not ignored.
    pub(super) fn finish(self) -> Result<(), ConfigError> {
        match self.map.keys().next() {
            None => Ok(()),
            Some(unknown) => Err(err(&self.field_path(unknown), "unknown field")),
        }
    }
}

pub(super) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn describe(v: &Value) -> String {
    match v {
        Value::Number(n) => n.to_string(),
        other => type_name(other).to_string(),
    }
}

/// One of a fixed set of strings.
pub(super) fn choice<T: Copy>(
    field: &str,
    value: &str,
    options: &[(&str, T)],
) -> Result<T, ConfigError> {
    options
        .iter()
        .find(|(name, _)| *name == value)
        .map(|(_, v)| *v)
        .ok_or_else(|| {
            let names: Vec<String> = options.iter().map(|(n, _)| format!("\"{n}\"")).collect();
            err(
                field,
                format!("expected one of {}, got \"{}\"", names.join(", "), value),
            )
        })
}

/// An HTTP header name (RFC 9110 token), lower-cased for Envoy's header maps.
pub(super) fn header_name(field: &str, value: &str) -> Result<String, ConfigError> {
    let ok = !value.is_empty()
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if !ok {
        return Err(err(
            field,
            format!("\"{value}\" is not a valid header name"),
        ));
    }
    Ok(value.to_ascii_lowercase())
}

/// Cluster names and authorities go into callout headers verbatim.
pub(super) fn plain_token(field: &str, value: &str) -> Result<String, ConfigError> {
    let ok = !value.is_empty()
        && value
            .bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'/' | b'?' | b'#' | b'"'));
    if !ok {
        return Err(err(field, format!("\"{value}\" is not a valid name")));
    }
    Ok(value.to_string())
}

/// The key prefix becomes part of a URL path segment on the Redis front, so it must
/// not need escaping there; and a `{` in it must open a whole hash tag, so that an
/// entry and its flush marker share a Redis Cluster slot
/// ([`ibex_wire::is_cluster_safe_prefix`]).
pub(super) fn key_prefix(field: &str, value: &str) -> Result<String, ConfigError> {
    if !ibex_wire::is_cluster_safe_prefix(value) {
        return Err(err(
            field,
            "a { must open a non-empty hash tag closed by } within the prefix",
        ));
    }
    let ok = value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b":_-.{}".contains(&b));
    if !ok || value.len() > 64 {
        return Err(err(
            field,
            "may only contain ASCII letters, digits and : _ - . { } (at most 64 characters)",
        ));
    }
    Ok(value.to_string())
}
