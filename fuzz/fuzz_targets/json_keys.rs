//! Shared by the fuzz targets: the top-level keys of a JSON object exactly as
//! serde_json decodes them, duplicates kept, to check the filter's readers against.

use serde::de::{Deserializer as _, IgnoredAny, MapAccess, Visitor};

/// The top-level keys of an object body as serde_json decodes them, duplicates
/// kept; None when the body is not one object, a key does not decode (a lone
/// surrogate escape) or a value is too deep for serde_json.
pub fn top_level_keys(bytes: &[u8]) -> Option<Vec<String>> {
    struct Keys;
    impl<'de> Visitor<'de> for Keys {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Vec<String>, A::Error> {
            let mut keys = Vec::new();
            while let Some(key) = map.next_key::<String>()? {
                map.next_value::<IgnoredAny>()?;
                keys.push(key);
            }
            Ok(keys)
        }
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let keys = (&mut de).deserialize_map(Keys).ok()?;
    de.end().ok()?;
    Some(keys)
}
