//! A response before it is written: status, headers and a complete body. Plain data, so the
//! payment flow can build answers without knowing which HTTP server writes them.

use serde::Serialize;

/// A response before it is written: status, headers and a complete body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub content_type: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(status: u16, value: &impl Serialize) -> Reply {
        Reply::with_type(status, "application/json", value)
    }

    pub fn problem(status: u16, value: &impl Serialize) -> Reply {
        Reply::with_type(status, "application/problem+json", value)
    }

    fn with_type(status: u16, content_type: &str, value: &impl Serialize) -> Reply {
        Reply {
            status,
            content_type: content_type.to_string(),
            headers: Vec::new(),
            // Serializing our own plain data types cannot fail; an empty body is the fallback.
            body: serde_json::to_vec(value).unwrap_or_default(),
        }
    }

    pub fn text(status: u16, content_type: &str, body: impl Into<Vec<u8>>) -> Reply {
        Reply {
            status,
            content_type: content_type.to_string(),
            headers: Vec::new(),
            body: body.into(),
        }
    }

    pub fn header(mut self, name: &str, value: impl Into<String>) -> Reply {
        self.headers.push((name.to_string(), value.into()));
        self
    }
}
