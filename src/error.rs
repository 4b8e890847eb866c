//! The JSON error body both listeners use:
//! `{"error":{"code":"<code>","message":"<human text>"}}`.

use bytes::Bytes;

/// Serializes an error body.
pub fn error_body(code: &str, message: &str) -> Bytes {
    #[derive(serde::Serialize)]
    struct Inner<'a> {
        code: &'a str,
        message: &'a str,
    }
    #[derive(serde::Serialize)]
    struct Outer<'a> {
        error: Inner<'a>,
    }
    Bytes::from(
        serde_json::to_vec(&Outer {
            error: Inner { code, message },
        })
        .expect("strings serialize"),
    )
}
