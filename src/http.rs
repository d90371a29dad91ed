//! Unit 01, accept and parse: the guards every request passes before it costs anything, and the
//! one way a response leaves the process.
//!
//! tiny_http parses the request line and headers but enforces no limits, so the limits of
//! SPEC §3 are checked here, on what it parsed ([`check_head`]). The body limit is decided from
//! `Content-Length` before a byte is read, and by counting for chunked bodies ([`read_body`]).
//!
//! Every response is written by [`send`] with `Connection: close`. That is the connection
//! policy: tiny_http gives each open connection a thread from a pool that can queue a new
//! connection behind threads still parked on idle keep-alive connections (NOTES-crates.md), so
//! a connection that serves exactly one request can never make another client's connection
//! wait. tiny_http's `Response::add_header` drops `Connection`, so the bytes are written here.

use std::io::{self, Read, Write};

use serde::Serialize;
use tiny_http::{Header, Request};

use crate::error::ApiError;

/// Longest request line accepted (414 above it).
pub const MAX_REQUEST_LINE: usize = 8 * 1024;
/// Largest header block accepted (431 above it).
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Most header fields accepted (431 above it).
pub const MAX_HEADER_FIELDS: usize = 100;

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

/// A declared body larger than this can only be refused by leaking the request (see [`send`]).
pub const ABSURD_BODY: u64 = 1 << 30;

/// Writes `reply` and consumes the request.
///
/// Normally the response is written here with `Connection: close` (the connection policy
/// above). One case cannot be: a refusal sent before a large body was read. tiny_http drains an
/// unread body when the request is dropped, and `into_writer` drops it *before* handing out the
/// writer, so the answer would wait for a body the client may never send. tiny_http's own
/// `respond` writes first and drains after, so that path is used there; it cannot say
/// `Connection: close`, but a client refused before sending its body closes anyway. A declared
/// length beyond [`ABSURD_BODY`] is worse: the drain allocates the whole length and aborts the
/// process. Such a request is leaked (never dropped, never answered) — one thread and one socket
/// — because aborting would take every other request down with it. nginx in front refuses
/// these before they arrive.
pub fn send(request: Request, reply: &Reply, body_consumed: bool) -> io::Result<()> {
    if !body_consumed {
        match unread_body(&request) {
            UnreadBody::None => {}
            UnreadBody::Drainable => return respond_then_drain(request, reply),
            UnreadBody::Absurd => {
                log::warn!(
                    "{} {}: a declared body of {} bytes cannot be drained; the request is parked unanswered",
                    request.method(),
                    request.url(),
                    header(&request, "Content-Length").unwrap_or("?")
                );
                std::mem::forget(request);
                return Ok(());
            }
        }
    }
    let head_only = *request.method() == tiny_http::Method::Head;
    let mut out = Vec::with_capacity(256 + reply.body.len());
    let reason = tiny_http::StatusCode(reply.status).default_reason_phrase();
    write!(out, "HTTP/1.1 {} {}\r\n", reply.status, reason)?;
    write!(out, "Content-Type: {}\r\n", reply.content_type)?;
    write!(out, "Content-Length: {}\r\n", reply.body.len())?;
    for (name, value) in &reply.headers {
        write!(out, "{name}: {value}\r\n")?;
    }
    out.extend_from_slice(b"Connection: close\r\n\r\n");
    if !head_only {
        out.extend_from_slice(&reply.body);
    }
    let mut writer = request.into_writer();
    let written = writer.write_all(&out).and_then(|_| writer.flush());
    match written {
        // A client that went away after asking is not the server's error.
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
            ) =>
        {
            Ok(())
        }
        other => other,
    }
}

enum UnreadBody {
    /// No body, or one tiny_http already read (≤ 1024 bytes without `Expect`).
    None,
    Drainable,
    Absurd,
}

fn unread_body(request: &Request) -> UnreadBody {
    let declared = header(request, "Content-Length").map(|v| v.trim().parse::<u64>());
    let streamed =
        header(request, "Transfer-Encoding").is_some() || header(request, "Expect").is_some();
    match declared {
        Some(Err(_)) => UnreadBody::Absurd,
        Some(Ok(n)) if n > ABSURD_BODY => UnreadBody::Absurd,
        Some(Ok(n)) if n > 1024 || (n > 0 && streamed) => UnreadBody::Drainable,
        None if streamed => UnreadBody::Drainable,
        _ => UnreadBody::None,
    }
}

fn respond_then_drain(request: Request, reply: &Reply) -> io::Result<()> {
    let mut response =
        tiny_http::Response::from_data(reply.body.clone()).with_status_code(reply.status);
    let headers = std::iter::once(("Content-Type", reply.content_type.as_str()))
        .chain(reply.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    for (name, value) in headers {
        if let Ok(h) = Header::from_bytes(name.as_bytes(), value.as_bytes()) {
            response.add_header(h);
        }
    }
    request.respond(response)
}

/// The value of the first header called `name`, if any.
pub fn header<'a>(request: &'a Request, name: &str) -> Option<&'a str> {
    request
        .headers()
        .iter()
        .find(|h| h.field.as_str().as_str().eq_ignore_ascii_case(name))
        .map(|h| h.value.as_str())
}

/// The size limits of SPEC §3 on what tiny_http has parsed: 414 for a long request line,
/// 431 for too many or too large headers.
pub fn check_head(request: &Request) -> Result<(), ApiError> {
    // "METHOD SP target SP HTTP/1.1": the method and version add at most ~20 bytes.
    let line = request.method().as_str().len() + 1 + request.url().len() + 9;
    if line > MAX_REQUEST_LINE {
        return Err(ApiError::UriTooLong);
    }
    check_headers(request.headers())
}

fn check_headers(headers: &[Header]) -> Result<(), ApiError> {
    if headers.len() > MAX_HEADER_FIELDS {
        return Err(ApiError::HeadersTooLarge(format!(
            "{} header fields; at most {MAX_HEADER_FIELDS} are accepted",
            headers.len()
        )));
    }
    // Each field is "name: value\r\n" on the wire.
    let bytes: usize = headers
        .iter()
        .map(|h| h.field.as_str().as_str().len() + h.value.as_str().len() + 4)
        .sum();
    if bytes > MAX_HEADER_BYTES {
        return Err(ApiError::HeadersTooLarge(format!(
            "the header block is {bytes} bytes; at most {MAX_HEADER_BYTES} are accepted"
        )));
    }
    Ok(())
}

/// 415 unless the body is declared `application/json` (parameters such as charset allowed).
pub fn require_json(request: &Request) -> Result<(), ApiError> {
    let declared = header(request, "Content-Type").unwrap_or("");
    let media = declared.split(';').next().unwrap_or("").trim();
    if media.eq_ignore_ascii_case("application/json") {
        Ok(())
    } else if declared.is_empty() {
        Err(ApiError::UnsupportedMediaType(
            "Content-Type is missing; send application/json".into(),
        ))
    } else {
        Err(ApiError::UnsupportedMediaType(format!(
            "Content-Type `{media}` is not supported; send application/json"
        )))
    }
}

/// Reads the whole body, refusing more than `limit` bytes: from `Content-Length` before reading
/// anything when it is present, by counting otherwise (chunked).
pub fn read_body(request: &mut Request, limit: u64) -> Result<Vec<u8>, ApiError> {
    if let Some(declared) = request.body_length() {
        if declared as u64 > limit {
            return Err(ApiError::BodyTooLarge { limit });
        }
    } else if let Some(raw) = header(request, "Content-Length") {
        // tiny_http ignores a Content-Length it cannot parse (e.g. beyond usize); so do we not.
        if raw.trim().parse::<u64>().map_or(true, |n| n > limit) {
            return Err(ApiError::BodyTooLarge { limit });
        }
    }
    let mut body = Vec::new();
    let read = request.as_reader().take(limit + 1).read_to_end(&mut body);
    match read {
        Ok(_) if body.len() as u64 > limit => Err(ApiError::BodyTooLarge { limit }),
        Ok(_) => Ok(body),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
            ) =>
        {
            Err(ApiError::RequestTimeout)
        }
        Err(e) => Err(ApiError::invalid(format!(
            "the request body could not be read: {e}"
        ))),
    }
}

/// The path without its query string, and the query string.
pub fn split_target(url: &str) -> (&str, &str) {
    url.split_once('?').unwrap_or((url, ""))
}

/// Decodes `a=1&b=x` into pairs; `+` and percent escapes are decoded, bad escapes kept as is.
pub fn query_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).map(|d| d as u8)
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let decoded = match bytes[i] {
            b'%' if i + 2 < bytes.len() => hex(bytes[i + 1])
                .zip(hex(bytes[i + 2]))
                .map(|(h, l)| h * 16 + l),
            _ => None,
        };
        match (decoded, bytes[i]) {
            (Some(b), _) => {
                out.push(b);
                i += 3;
            }
            (None, b'+') => {
                out.push(b' ');
                i += 1;
            }
            (None, b) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A client's `X-Request-Id` if it is sane (1–128 visible ASCII), else a fresh one.
pub fn request_id(request: &Request) -> String {
    match header(request, "X-Request-Id") {
        Some(v) if is_visible_ascii(v, 128) => v.to_string(),
        _ => crate::ids::request_id(),
    }
}

/// 1..=max characters, each visible ASCII (0x21..=0x7E).
pub fn is_visible_ascii(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && s.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_blocks_over_the_limits_are_refused() {
        let h = |n: usize, len: usize| -> Vec<Header> {
            (0..n)
                .map(|i| Header::from_bytes(format!("X-{i}").as_bytes(), vec![b'a'; len]).unwrap())
                .collect()
        };
        assert!(check_headers(&h(100, 10)).is_ok());
        assert!(matches!(
            check_headers(&h(101, 1)),
            Err(ApiError::HeadersTooLarge(_))
        ));
        assert!(matches!(
            check_headers(&h(2, 9000)),
            Err(ApiError::HeadersTooLarge(_))
        ));
    }

    #[test]
    fn queries_decode() {
        assert_eq!(
            query_pairs("limit=5&starting_after=pay_%41b+c&x"),
            vec![
                ("limit".into(), "5".into()),
                ("starting_after".into(), "pay_Ab c".into()),
                ("x".into(), "".into())
            ]
        );
        assert_eq!(query_pairs("a=%zz%"), vec![("a".into(), "%zz%".into())]);
        assert_eq!(split_target("/payments?limit=1"), ("/payments", "limit=1"));
    }

    #[test]
    fn request_ids_must_be_visible_ascii() {
        assert!(is_visible_ascii("abc-123", 128));
        assert!(!is_visible_ascii("", 128));
        assert!(!is_visible_ascii("has space", 128));
        assert!(!is_visible_ascii(&"a".repeat(129), 128));
    }
}
