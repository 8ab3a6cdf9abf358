//! Bytes in JSON: a plain string when they are UTF-8, `{"bytes": "<base64>"}`
//! otherwise, so paths and xattr values survive a round trip exactly.

use base64::Engine;
use serde_json::{json, Value};

/// Encode bytes.
pub fn to_json(bytes: &[u8]) -> Value {
    match std::str::from_utf8(bytes) {
        Ok(s) => Value::String(s.to_string()),
        Err(_) => json!({ "bytes": base64::engine::general_purpose::STANDARD.encode(bytes) }),
    }
}

/// Decode what [`to_json`] wrote; `None` if it is neither form.
pub fn from_json(v: &Value) -> Option<Vec<u8>> {
    match v {
        Value::String(s) => Some(s.as_bytes().to_vec()),
        Value::Object(m) => m
            .get("bytes")
            .and_then(Value::as_str)
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok()),
        _ => None,
    }
}

/// serde adapter for `PathBuf` fields.
pub mod path {
    use std::ffi::OsString;
    use std::os::unix::ffi::OsStringExt;
    use std::path::{Path, PathBuf};

    use serde::{de::Error, Deserialize, Deserializer, Serialize, Serializer};

    /// Serialize a path as bytes.
    pub fn serialize<S: Serializer>(p: &Path, s: S) -> Result<S::Ok, S::Error> {
        super::to_json(p.as_os_str().as_encoded_bytes()).serialize(s)
    }

    /// Deserialize a path written by [`serialize`].
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        super::from_json(&v)
            .map(|b| PathBuf::from(OsString::from_vec(b)))
            .ok_or_else(|| D::Error::custom("expected a path string or {\"bytes\": base64}"))
    }
}

/// serde adapter for `Vec<u8>` fields (text when UTF-8, else base64).
pub mod bytes {
    use serde::{de::Error, Deserialize, Deserializer, Serialize, Serializer};

    /// Serialize bytes.
    pub fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        super::to_json(b).serialize(s)
    }

    /// Deserialize bytes written by [`serialize`].
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        super::from_json(&v)
            .ok_or_else(|| D::Error::custom("expected a string or {\"bytes\": base64}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_non_utf8() {
        for b in [&b"usr/bin"[..], b"a\xff\xfe", b"new\nline"] {
            assert_eq!(from_json(&to_json(b)).unwrap(), b);
        }
        assert!(to_json(b"\xff").is_object());
    }
}
