//! Unit 01, reading one request off a client socket within its deadline: the head (request
//! line and headers, parsed by httparse and bounded in size), the framing (`Content-Length` or
//! chunked, checked strictly: a request two parties could read differently is refused), and the
//! body. Whatever breaks a limit is a `Refusal`, which the front answers itself; what passes
//! is an `Incoming` request, complete, for tiny_http.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::edge::http;
use crate::error::ApiError;
use crate::ids::is_visible_ascii;

/// Longest request line accepted (414 above it).
pub const MAX_REQUEST_LINE: usize = 8 * 1024;
/// Largest header block accepted, request line excluded (431 above it).
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Most header fields accepted (431 above it).
pub const MAX_HEADER_FIELDS: usize = 100;
/// The header that carries, from the front to the dispatcher, when the request was read off the
/// socket (µs since `front::epoch`). A client's copy of it is dropped.
pub const RECEIVED_HEADER: &str = "X-Paytrace-Received-Us";
/// Longest chunk-size line (with extensions) in a chunked body.
pub const MAX_CHUNK_LINE: usize = 1024;
/// How long a refused client may keep sending before the socket is closed under it, and how
/// much of what it sends is read and dropped meanwhile: closing with unread input resets the
/// connection, which can destroy the answer before the client reads it.
pub const LINGER: Duration = Duration::from_millis(500);
pub const LINGER_BYTES: usize = 1 << 20;
/// After the listener closed, how long a connection still has to send its whole request (one
/// that has sent nothing yet is then closed without an answer; one half-way gets 408).
const GRACE_AT_SHUTDOWN: Duration = Duration::from_secs(1);
/// How often a blocked read wakes to notice that the listener closed.
const WAKE: Duration = Duration::from_millis(100);

/// A complete, checked request, ready for tiny_http.
pub(super) struct Incoming {
    pub(super) method: String,
    pub(super) target: String,
    /// End-to-end headers as received (hop-by-hop ones and framing removed).
    pub(super) headers: Vec<(String, String)>,
    pub(super) body: Vec<u8>,
    /// The client's `X-Request-Id` when it is sane, else a fresh one: tiny_http gets this one.
    pub(super) request_id: String,
    /// When the first byte of it arrived, and when the last.
    pub(super) accepted: Instant,
    pub(super) read_at: Instant,
    /// The client may send another request on this connection: HTTP/1.1 without
    /// `Connection: close`.
    pub(super) keep_alive: bool,
}

/// Why the front answers a request itself.
pub(super) struct Refusal {
    pub(super) error: Box<ApiError>,
    pub(super) request_id: Option<String>,
    pub(super) method: String,
    pub(super) path: String,
}

impl Refusal {
    fn bare(error: ApiError) -> Refusal {
        Refusal {
            error: Box::new(error),
            request_id: None,
            method: "-".into(),
            path: String::new(),
        }
    }
}

/// The client socket, what has been read from it and not yet used, and the moment by which the
/// whole request must have arrived.
pub(super) struct Conn {
    pub(super) stream: TcpStream,
    pub(super) buf: Vec<u8>,
    pub(super) deadline: Instant,
    /// Set when the listener closes: the deadline then shrinks to [`GRACE_AT_SHUTDOWN`].
    pub(super) closed_at: Arc<OnceLock<Instant>>,
}

pub(super) enum Fill {
    More,
    Eof,
    TimedOut,
}

impl Conn {
    /// Reads whatever arrives next, waiting at most until the deadline (and at most `cap`).
    fn fill(&mut self, cap: Duration) -> io::Result<Fill> {
        if let Some(closed) = self.closed_at.get() {
            self.deadline = self.deadline.min(*closed + GRACE_AT_SHUTDOWN);
        }
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(Fill::TimedOut);
        }
        self.stream
            .set_read_timeout(Some(left.min(cap).max(Duration::from_millis(1))))?;
        let mut chunk = [0u8; 8192];
        match self.stream.read(&mut chunk) {
            Ok(0) => Ok(Fill::Eof),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(Fill::More)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if Instant::now() >= self.deadline {
                    Ok(Fill::TimedOut)
                } else {
                    Ok(Fill::More)
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(Fill::More),
            Err(e) => Err(e),
        }
    }

    /// Waits for the request's first byte; false if none came before the deadline. The whole
    /// request must arrive by the same deadline, counted from the accept.
    pub(super) fn wait_for_first_byte(&mut self) -> bool {
        loop {
            match self.fill(WAKE) {
                Ok(Fill::More) if !self.buf.is_empty() => return true,
                Ok(Fill::More) => {}
                Ok(Fill::Eof | Fill::TimedOut) | Err(_) => return false,
            }
        }
    }

    /// After a refusal: stop writing, then read (and discard) what the client is still sending
    /// for a short while, so closing does not reset the connection before it read the answer.
    pub(super) fn linger(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Write);
        self.deadline = Instant::now() + LINGER;
        let mut discarded = 0usize;
        while discarded < LINGER_BYTES {
            self.buf.clear();
            match self.fill(LINGER) {
                Ok(Fill::More) => discarded += self.buf.len().max(1),
                _ => break,
            }
        }
    }
}

/// Reads the head, checks it, then reads the body; any violation is a [`Refusal`].
pub(super) fn read_request(
    conn: &mut Conn,
    max_body: u64,
    accepted: Instant,
) -> Result<Incoming, Refusal> {
    let head_len = read_head(conn)?;
    let head = conn.buf[..head_len].to_vec();
    conn.buf.drain(..head_len);
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADER_FIELDS];
    let mut parsed = httparse::Request::new(&mut headers);
    // read_head already parsed it completely; a second parse of the same bytes cannot differ.
    if let Err(e) = parsed.parse(&head) {
        return Err(Refusal::bare(head_error(e)));
    }
    let method = parsed.method.unwrap_or("-").to_string();
    let target = parsed.path.unwrap_or("").to_string();
    let http11 = parsed.version == Some(1);
    let path: String = http::split_target(&target).0.chars().take(200).collect();
    let mut request_id = None;
    if !target.bytes().all(|b| (0x21..0x7f).contains(&b)) {
        // tiny_http reads only ASCII lines; percent-encode anything else.
        return Err(Refusal {
            error: Box::new(ApiError::invalid(
                "the request target must be visible ASCII (percent-encode the rest)",
            )),
            request_id,
            method,
            path,
        });
    }
    let mut framing = Framing::default();
    let mut keep_alive = http11;
    let mut forwarded = Vec::with_capacity(parsed.headers.len());
    let refuse = |error: ApiError, request_id: &Option<String>| Refusal {
        error: Box::new(error),
        request_id: request_id.clone(),
        method: method.clone(),
        path: path.clone(),
    };
    for h in parsed.headers.iter() {
        // tiny_http accepts only ASCII; a value with a control character (NUL above all) is
        // refused here rather than passed on.
        let Some(value) = header_value(h.value) else {
            return Err(refuse(
                ApiError::invalid(format!(
                    "header `{}` has a value that is not printable ASCII",
                    h.name
                )),
                &request_id,
            ));
        };
        let name = h.name;
        if name.eq_ignore_ascii_case("X-Request-Id") && is_visible_ascii(value, 128) {
            request_id.get_or_insert_with(|| value.to_string());
        }
        if name.eq_ignore_ascii_case("Connection")
            && value
                .split(',')
                .any(|token| token.trim().eq_ignore_ascii_case("close"))
        {
            keep_alive = false;
        }
        match framing.observe(name, value) {
            Ok(true) => continue,
            Ok(false) => {}
            Err(error) => return Err(refuse(error, &request_id)),
        }
        if is_hop_by_hop(name)
            || name.eq_ignore_ascii_case(RECEIVED_HEADER)
            || name.eq_ignore_ascii_case("X-Request-Id")
        {
            continue;
        }
        forwarded.push((name.to_string(), value.to_string()));
    }
    let body = match framing.body(max_body) {
        Err(e) => return Err(refuse(e, &request_id)),
        Ok(BodyFraming::None) => Vec::new(),
        Ok(framed) => {
            if framing.expect_continue && http11 {
                // The client waits for this before sending the body.
                let _ = conn.stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
            }
            match framed {
                BodyFraming::Length(n) => read_exact_body(conn, n as usize),
                _ => read_chunked_body(conn, max_body),
            }
            .map_err(|e| refuse(e, &request_id))?
        }
    };
    Ok(Incoming {
        method,
        target,
        headers: forwarded,
        body,
        request_id: request_id.unwrap_or_else(crate::ids::request_id),
        accepted,
        read_at: Instant::now(),
        keep_alive,
    })
}

/// Reads until the head is complete; returns its length.
fn read_head(conn: &mut Conn) -> Result<usize, Refusal> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADER_FIELDS];
        let mut parsed = httparse::Request::new(&mut headers);
        match parsed.parse(&conn.buf) {
            Ok(httparse::Status::Complete(n)) => {
                let line = conn.buf.iter().position(|&b| b == b'\n').unwrap_or(n);
                if line > MAX_REQUEST_LINE {
                    return Err(Refusal::bare(ApiError::UriTooLong));
                }
                if n - line > MAX_HEADER_BYTES {
                    return Err(Refusal::bare(headers_too_large()));
                }
                return Ok(n);
            }
            Ok(httparse::Status::Partial) => {}
            Err(e) => return Err(Refusal::bare(head_error(e))),
        }
        // Bounds before reading more: the request line, then the header block.
        match conn.buf.iter().position(|&b| b == b'\n') {
            None if conn.buf.len() > MAX_REQUEST_LINE => {
                return Err(Refusal::bare(ApiError::UriTooLong));
            }
            Some(line) if line > MAX_REQUEST_LINE => {
                return Err(Refusal::bare(ApiError::UriTooLong));
            }
            Some(line) if conn.buf.len() - line > MAX_HEADER_BYTES + 4 => {
                return Err(Refusal::bare(headers_too_large()));
            }
            _ => {}
        }
        match conn.fill(WAKE) {
            Ok(Fill::More) => {}
            Ok(Fill::TimedOut) => return Err(Refusal::bare(ApiError::RequestTimeout)),
            Ok(Fill::Eof) | Err(_) => {
                return Err(Refusal::bare(ApiError::invalid(
                    "the connection ended inside the request head",
                )));
            }
        }
    }
}

fn headers_too_large() -> ApiError {
    ApiError::HeadersTooLarge(format!(
        "the header block is over {MAX_HEADER_BYTES} bytes or {MAX_HEADER_FIELDS} fields"
    ))
}

fn head_error(e: httparse::Error) -> ApiError {
    match e {
        httparse::Error::Version => ApiError::VersionNotSupported,
        httparse::Error::TooManyHeaders => headers_too_large(),
        httparse::Error::HeaderName | httparse::Error::HeaderValue | httparse::Error::NewLine => {
            ApiError::invalid(format!("malformed header: {e}"))
        }
        _ => ApiError::invalid(format!("malformed request line: {e}")),
    }
}

/// Printable ASCII, space and tab only.
fn header_value(raw: &[u8]) -> Option<&str> {
    raw.iter()
        .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
        .then(|| std::str::from_utf8(raw).ok())
        .flatten()
}

/// Headers that describe this connection, not the request: the front speaks for itself to
/// tiny_http (`Connection: close`, an exact `Content-Length`).
fn is_hop_by_hop(name: &str) -> bool {
    [
        "Connection",
        "Keep-Alive",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Content-Length",
        "Expect",
    ]
    .iter()
    .any(|h| h.eq_ignore_ascii_case(name))
}

/// What the framing headers said, checked strictly: a request whose length two parties could
/// read differently is refused (RFC 9112 §6.3).
#[derive(Default, Debug)]
struct Framing {
    content_length: Option<u64>,
    chunked: bool,
    expect_continue: bool,
}

#[derive(Debug, PartialEq, Eq)]
enum BodyFraming {
    None,
    Length(u64),
    Chunked,
}

impl Framing {
    /// Takes one header; `Ok(true)` if it was a framing header (consumed), an error naming the
    /// problem if it makes the framing ambiguous.
    fn observe(&mut self, name: &str, value: &str) -> Result<bool, ApiError> {
        let value = value.trim_matches([' ', '\t']);
        if name.eq_ignore_ascii_case("Content-Length") {
            if self.content_length.is_some() {
                return Err(ApiError::invalid("Content-Length is sent more than once"));
            }
            let digits = !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit());
            let n = value
                .parse::<u64>()
                .ok()
                .filter(|_| digits)
                .ok_or_else(|| {
                    ApiError::invalid(format!("Content-Length `{value}` is not a decimal length"))
                })?;
            self.content_length = Some(n);
            Ok(true)
        } else if name.eq_ignore_ascii_case("Transfer-Encoding") {
            if self.chunked || !value.eq_ignore_ascii_case("chunked") {
                return Err(ApiError::invalid(format!(
                    "Transfer-Encoding `{value}` is not supported; send Content-Length or chunked once"
                )));
            }
            self.chunked = true;
            Ok(true)
        } else if name.eq_ignore_ascii_case("Expect") {
            if !value.eq_ignore_ascii_case("100-continue") {
                return Err(ApiError::ExpectationFailed);
            }
            self.expect_continue = true;
            Ok(true)
        } else {
            Ok(false)
        }
    }

    fn body(&self, limit: u64) -> Result<BodyFraming, ApiError> {
        match (self.content_length, self.chunked) {
            (Some(_), true) => Err(ApiError::invalid(
                "Content-Length and Transfer-Encoding together make the body's length ambiguous",
            )),
            (Some(n), false) if n > limit => Err(ApiError::BodyTooLarge { limit }),
            (Some(0), false) | (None, false) => Ok(BodyFraming::None),
            (Some(n), false) => Ok(BodyFraming::Length(n)),
            (None, true) => Ok(BodyFraming::Chunked),
        }
    }
}

fn read_exact_body(conn: &mut Conn, n: usize) -> Result<Vec<u8>, ApiError> {
    while conn.buf.len() < n {
        match conn.fill(WAKE) {
            Ok(Fill::More) => {}
            Ok(Fill::TimedOut) => return Err(ApiError::RequestTimeout),
            Ok(Fill::Eof) | Err(_) => {
                return Err(ApiError::invalid(
                    "the connection ended before the declared Content-Length arrived",
                ));
            }
        }
    }
    let body = conn.buf[..n].to_vec();
    conn.buf.drain(..n);
    Ok(body)
}

/// Decodes a chunked body, refusing it as soon as it passes `limit`.
fn read_chunked_body(conn: &mut Conn, limit: u64) -> Result<Vec<u8>, ApiError> {
    let mut body = Vec::new();
    loop {
        let size = loop {
            match httparse::parse_chunk_size(&conn.buf) {
                Ok(httparse::Status::Complete((used, size))) => {
                    conn.buf.drain(..used);
                    break size;
                }
                Ok(httparse::Status::Partial) if conn.buf.len() > MAX_CHUNK_LINE => {
                    return Err(ApiError::invalid("a chunk-size line is too long"));
                }
                Ok(httparse::Status::Partial) => more(conn)?,
                Err(_) => return Err(ApiError::invalid("malformed chunked body")),
            }
        };
        if size == 0 {
            // Trailers are read and dropped, up to the empty line, within the same bound.
            loop {
                if let Some(end) = find(&conn.buf, b"\r\n") {
                    let empty = end == 0;
                    conn.buf.drain(..end + 2);
                    if empty {
                        return Ok(body);
                    }
                } else if conn.buf.len() > MAX_CHUNK_LINE {
                    return Err(ApiError::invalid("a chunked trailer is too long"));
                } else {
                    more(conn)?;
                }
            }
        }
        if body.len() as u64 + size > limit {
            return Err(ApiError::BodyTooLarge { limit });
        }
        let size = size as usize;
        while conn.buf.len() < size + 2 {
            more(conn)?;
        }
        if &conn.buf[size..size + 2] != b"\r\n" {
            return Err(ApiError::invalid("malformed chunked body"));
        }
        body.extend_from_slice(&conn.buf[..size]);
        conn.buf.drain(..size + 2);
    }
}

fn more(conn: &mut Conn) -> Result<(), ApiError> {
    match conn.fill(WAKE) {
        Ok(Fill::More) => Ok(()),
        Ok(Fill::TimedOut) => Err(ApiError::RequestTimeout),
        Ok(Fill::Eof) | Err(_) => Err(ApiError::invalid(
            "the connection ended inside the chunked body",
        )),
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framing(headers: &[(&str, &str)]) -> Result<Framing, ApiError> {
        let mut f = Framing::default();
        for (n, v) in headers {
            f.observe(n, v)?;
        }
        Ok(f)
    }

    #[test]
    fn content_length_must_be_one_plain_decimal() {
        for bad in [
            "abc",
            "-1",
            "+52",
            "99999999999999999999",
            "",
            "1 2",
            "0x10",
        ] {
            assert!(framing(&[("Content-Length", bad)]).is_err(), "{bad}");
        }
        assert!(framing(&[("Content-Length", "5"), ("content-length", "5")]).is_err());
        let f = framing(&[("Content-Length", " 52 ")]).unwrap();
        assert_eq!(f.body(100).unwrap(), BodyFraming::Length(52));
        assert!(matches!(
            f.body(10),
            Err(ApiError::BodyTooLarge { limit: 10 })
        ));
        assert_eq!(
            framing(&[("Content-Length", "0")])
                .unwrap()
                .body(1)
                .unwrap(),
            BodyFraming::None
        );
    }

    #[test]
    fn length_and_chunked_together_are_ambiguous() {
        let f = framing(&[("Content-Length", "5"), ("Transfer-Encoding", "chunked")]).unwrap();
        assert!(matches!(f.body(100), Err(ApiError::InvalidRequest { .. })));
        assert!(framing(&[("Transfer-Encoding", "gzip, chunked")]).is_err());
        assert!(
            framing(&[
                ("Transfer-Encoding", "chunked"),
                ("Transfer-Encoding", "chunked")
            ])
            .is_err()
        );
        assert_eq!(
            framing(&[("Transfer-Encoding", "Chunked")])
                .unwrap()
                .body(1)
                .unwrap(),
            BodyFraming::Chunked
        );
    }

    #[test]
    fn only_100_continue_is_an_acceptable_expectation() {
        assert!(
            framing(&[("Expect", "100-continue")])
                .unwrap()
                .expect_continue
        );
        assert!(framing(&[("Expect", "200-ok")]).is_err());
    }

    #[test]
    fn header_values_must_be_printable_ascii() {
        assert_eq!(header_value(b"a b\tc"), Some("a b\tc"));
        assert_eq!(header_value(b"a\0b"), None);
        assert_eq!(header_value("é".as_bytes()), None);
    }

    #[test]
    fn http2_and_unknown_versions_are_505() {
        for line in [
            &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..],
            b"GET / HTTP/1.2\r\n\r\n",
            b"GET / HTTP/3.0\r\n\r\n",
        ] {
            let mut h = [httparse::EMPTY_HEADER; 4];
            let e = httparse::Request::new(&mut h).parse(line).unwrap_err();
            assert_eq!(head_error(e).status(), 505);
        }
    }
}
