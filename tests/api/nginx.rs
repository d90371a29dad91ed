//! The production front: the shipped `data/nginx/paytrace.conf`, run by a real nginx on free
//! ports in front of the real binary.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::helpers::*;

/// A real nginx running the shipped config; killed when dropped.
pub struct Nginx {
    child: Child,
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Nginx {
    /// The shipped config with its listen port and upstream servers replaced.
    pub fn start(upstreams: &[SocketAddr]) -> Nginx {
        Nginx::with("paytrace.conf", |shipped, port| {
            let servers: String = upstreams
                .iter()
                .map(|a| format!("server {a} max_fails=0;\n        "))
                .collect();
            let conf = shipped
                .replace(
                    "listen 127.0.0.1:8000;",
                    &format!("listen 127.0.0.1:{port};"),
                )
                .replace("server 127.0.0.1:8080 max_fails=0;\n        ", &servers);
            assert!(
                conf.contains(&format!(":{port}")) && !conf.contains("server 127.0.0.1:8080"),
                "the config's shape changed"
            );
            conf
        })
    }

    /// The shipped `data/nginx/{file}`, made by `configure` into the config for a free `port`,
    /// run by a real nginx; returns once it listens.
    pub fn with(file: &str, configure: impl FnOnce(String, u16) -> String) -> Nginx {
        let shipped =
            std::fs::read_to_string(format!("{}/data/nginx/{file}", env!("CARGO_MANIFEST_DIR")))
                .unwrap();
        let port = dead_addr().port();
        let conf = configure(shipped, port);
        let dir = tempfile::tempdir().unwrap();
        for sub in ["logs", "temp"] {
            std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        }
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let child = Command::new("nginx")
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&conf_path)
            // One foreground process that does not switch users: fine for a test.
            .args(["-g", "daemon off; master_process off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx is installed (.ci/run installs it)");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        eventually(Duration::from_secs(10), "nginx listens", || {
            TcpStream::connect(addr).ok()
        });
        Nginx {
            child,
            addr,
            _dir: dir,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// A TCP relay in front of paytrace that counts the connections it is given. Put between nginx
/// and paytrace, it turns "paytrace never saw it" into a count that can be wrong: nginx opens
/// one upstream connection per request it forwards (the shipped config has no upstream
/// keep-alive), so the count is the number of requests that reached paytrace.
pub struct Relay {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Relay {
    pub fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, stopped) = (accepted.clone(), stop.clone());
        thread::spawn(move || {
            for conn in listener.incoming() {
                if stopped.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(down) = conn else { continue };
                count.fetch_add(1, Ordering::SeqCst);
                if let Ok(up) = TcpStream::connect(target) {
                    pipe(down, up);
                }
            }
        });
        Relay {
            addr,
            accepted,
            stop,
        }
    }

    /// Connections accepted so far: requests nginx forwarded to paytrace.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop so that it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

/// Copies both ways until each side ends, passing each end on as a half-close.
fn pipe(down: TcpStream, up: TcpStream) {
    let (Ok(down2), Ok(up2)) = (down.try_clone(), up.try_clone()) else {
        return;
    };
    for (mut from, mut to) in [(down, up), (up2, down2)] {
        thread::spawn(move || {
            let _ = std::io::copy(&mut from, &mut to);
            let _ = to.shutdown(Shutdown::Write);
        });
    }
}

#[test]
fn a_payment_succeeds_through_nginx_with_the_request_id_passed_through() {
    let serve = Serve::start(&[]);
    let nginx = Nginx::start(&[serve.proc.addr]);
    let r = pay_with(
        &nginx.url(),
        "via-nginx",
        &body(100),
        &[("X-Request-Id", "trace-via-nginx")],
    );
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.header("X-Request-Id"), Some("trace-via-nginx"));
    assert_eq!(r.body["status"], "succeeded");
    let again = pay(&nginx.url(), "via-nginx", &body(100));
    assert_eq!(again.header("Idempotent-Replayed"), Some("true"));
}

#[test]
fn an_absurd_content_length_gets_413_from_nginx_and_paytrace_stays_up() {
    let serve = Serve::start(&[]);
    let relay = Relay::start(serve.proc.addr);
    let nginx = Nginx::start(&[relay.addr]);
    let request = format!(
        "POST /payments HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nIdempotency-Key: huge\r\n\
         Content-Type: application/json\r\nContent-Length: 9000000000000000000\r\n\r\n"
    );
    let (status, text) = raw(nginx.addr, request.as_bytes(), Duration::from_secs(10));
    assert_eq!(status, 413, "{text}");
    assert_eq!(relay.accepted(), 0, "paytrace never saw it");
    assert_eq!(pay(&nginx.url(), "after-huge", &body(100)).status, 201);
    // The relay does count what nginx forwards.
    assert_eq!(relay.accepted(), 1);
}

#[test]
fn a_client_sending_its_headers_a_byte_a_second_is_cut_off_by_nginx() {
    let serve = Serve::start(&[]);
    let relay = Relay::start(serve.proc.addr);
    let nginx = Nginx::start(&[relay.addr]);
    let mut s = TcpStream::connect(nginx.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(1000)))
        .unwrap();
    let request =
        b"POST /payments HTTP/1.1\r\nHost: slow\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaa\r\n";
    let t = Instant::now();
    let mut closed_after = None;
    for byte in request.iter() {
        // Pacing the client, one byte a second; each read waits up to a second for nginx.
        if s.write_all(&[*byte]).is_err() {
            closed_after = Some(t.elapsed());
            break;
        }
        let mut buf = [0u8; 512];
        match s.read(&mut buf) {
            Ok(_) => {
                // 0 bytes: closed; anything else is nginx's 408 before it closes.
                closed_after = Some(t.elapsed());
                break;
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => {
                closed_after = Some(t.elapsed());
                break;
            }
        }
    }
    let closed_after =
        closed_after.expect("nginx closed the slow connection before the headers ended");
    assert!(
        closed_after >= Duration::from_secs(4) && closed_after < Duration::from_secs(9),
        "closed after {closed_after:?}; client_header_timeout is 5s"
    );
    assert_eq!(relay.accepted(), 0, "paytrace never saw it");
    assert_eq!(pay(&nginx.url(), "after-slow", &body(100)).status, 201);
    assert_eq!(relay.accepted(), 1, "the relay counts what nginx forwards");
}

#[test]
fn a_post_that_fails_upstream_is_not_retried_on_another() {
    let serve = Serve::start(&[]);
    // An upstream that accepts and hangs up at once, first in the rotation.
    let broken = TcpListener::bind("127.0.0.1:0").unwrap();
    let broken_addr = broken.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let seen = accepted.clone();
    thread::spawn(move || {
        for conn in broken.incoming() {
            seen.fetch_add(1, Ordering::SeqCst);
            drop(conn);
        }
    });
    let relay = Relay::start(serve.proc.addr);
    let nginx = Nginx::start(&[broken_addr, relay.addr]);
    let r = pay(&nginx.url(), "no-retry", &body(100));
    assert_eq!(
        r.status, 502,
        "nginx answers the failure itself: {:?}",
        r.body
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    assert_eq!(relay.accepted(), 0, "not retried on paytrace");
    assert_eq!(provider_stats(&serve.provider_url)["requests"], 0);
}
