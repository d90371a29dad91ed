//! Unit 01, parse: what the handlers need from a request tiny_http parsed, and the one way a
//! response leaves the process.
//!
//! The limits on what a client may send (sizes, framing, a total read deadline) are enforced
//! earlier, by the front that owns the socket (`front.rs`); tiny_http only sees requests that
//! passed them. Here: the body (read whole, refused over `--max-body`), the media type, the
//! query string, the request id.
//!
//! Every response is written by [`send`] with `Connection: close`: one request per connection
//! between the front and tiny_http (the front turns it into `keep-alive` toward a client it
//! keeps).
//! tiny_http's `Response::add_header` drops `Connection`, so the bytes are written here.

use std::io::{self, Read, Write};

use tiny_http::Request;

use crate::error::ApiError;
use crate::ids::is_visible_ascii;
use crate::reply::Reply;

/// The bytes of `reply` on the wire, always with `Connection: close` (see the module docs).
pub fn encode(reply: &Reply, head_only: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + reply.body.len());
    let reason = tiny_http::StatusCode(reply.status).default_reason_phrase();
    let _ = write!(out, "HTTP/1.1 {} {}\r\n", reply.status, reason);
    let _ = write!(out, "Content-Type: {}\r\n", reply.content_type);
    let _ = write!(out, "Content-Length: {}\r\n", reply.body.len());
    for (name, value) in &reply.headers {
        let _ = write!(out, "{name}: {value}\r\n");
    }
    out.extend_from_slice(b"Connection: close\r\n\r\n");
    if !head_only {
        out.extend_from_slice(&reply.body);
    }
    out
}

/// Writes `reply` and consumes the request. The front handed tiny_http the whole body with an
/// exact length, so whatever the handler left unread is already in the socket's buffer and
/// tiny_http's drain of it (when `into_writer` drops the body reader) cannot wait on a client.
pub fn send(request: Request, reply: &Reply) -> io::Result<()> {
    let head_only = *request.method() == tiny_http::Method::Head;
    let out = encode(reply, head_only);
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

/// The value of the first header called `name`, if any.
pub fn header<'a>(request: &'a Request, name: &str) -> Option<&'a str> {
    request
        .headers()
        .iter()
        .find(|h| h.field.as_str().as_str().eq_ignore_ascii_case(name))
        .map(|h| h.value.as_str())
}

/// 415 unless the body is declared `application/json` (parameters such as charset allowed).
pub fn require_json(request: &Request) -> Result<(), ApiError> {
    require_json_type(header(request, "Content-Type"))
}

/// 415 unless `content_type` (the header's value, if any) is `application/json`.
pub fn require_json_type(content_type: Option<&str>) -> Result<(), ApiError> {
    let declared = content_type.unwrap_or("");
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
    request_id_from(header(request, "X-Request-Id"))
}

/// The request id for a request whose `X-Request-Id` header is `given`.
pub fn request_id_from(given: Option<&str>) -> String {
    match given {
        Some(v) if is_visible_ascii(v, 128) => v.to_string(),
        _ => crate::ids::request_id(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
