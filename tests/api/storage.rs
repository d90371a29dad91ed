//! A database that cannot be written is named, not hidden: refused at start-up (exit 1 naming
//! the file), and a disk that fills at run time answers 503 `storage-unavailable`, logs the
//! cause once, fails readiness until a write succeeds again, and keeps a sent charge `pending`.
//!
//! Tests run as root in CI, where file modes stop nothing: the read-only case uses a read-only
//! bind mount (and a 0444 file opened by an unprivileged user through `setpriv`), the disk-full
//! case a small tmpfs filled to the last byte. Both need root to mount; run as another user,
//! the read-only case falls back to a plain 0444 file and the disk-full case says it is skipped.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::helpers::*;

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A mount made by the test, unmounted (lazily, so a leftover process cannot keep it) when
/// dropped.
struct Mount(PathBuf);

impl Mount {
    fn run(args: &[&str]) {
        let out = Command::new("mount")
            .args(args)
            .output()
            .expect("mount runs");
        assert!(
            out.status.success(),
            "mount {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A read-only view of `source` at `at`.
    fn read_only_bind(source: &Path, at: &Path) -> Mount {
        let (s, a) = (source.to_str().unwrap(), at.to_str().unwrap());
        Mount::run(&["--bind", s, a]);
        let m = Mount(at.to_path_buf());
        Mount::run(&["-o", "remount,ro,bind", a]);
        m
    }

    fn tmpfs(at: &Path, size: &str) -> Mount {
        Mount::run(&[
            "-t",
            "tmpfs",
            "-o",
            &format!("size={size}"),
            "tmpfs",
            at.to_str().unwrap(),
        ]);
        Mount(at.to_path_buf())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Runs `serve` on `db` expecting it to refuse to start: its exit code (`None` if it was
/// still running after 20 s, then killed) and stderr.
fn serve_refuses(mut cmd: Command, db: &Path) -> (Option<i32>, String) {
    let mut child = cmd
        .args([
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--db",
            db.to_str().unwrap(),
        ])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("paytrace runs");
    let deadline = Instant::now() + Duration::from_secs(20);
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut stderr);
    (code, stderr)
}

/// A migrated database in `dir`, made by a `serve` that is then stopped.
fn make_database(dir: tempfile::TempDir) -> tempfile::TempDir {
    let serve = Serve::start_in(dir, &[]);
    serve.kill9()
}

#[test]
fn a_database_that_cannot_be_written_is_refused_at_start_up_naming_the_file() {
    let dir = make_database(tempfile::tempdir().unwrap());
    let binary = env!("CARGO_BIN_EXE_paytrace");
    if is_root() {
        // Root ignores file modes: a read-only mount stops it.
        let view = tempfile::tempdir().unwrap();
        let _ro = Mount::read_only_bind(dir.path(), view.path());
        let db = view.path().join("paytrace.db");
        let (code, stderr) = serve_refuses(Command::new(binary), &db);
        assert_eq!(code, Some(1), "{stderr}");
        assert!(stderr.contains(db.to_str().unwrap()), "{stderr}");
        assert!(!stderr.contains("listening on"), "{stderr}");
    }
    // A 0444 file in a writable directory, opened by a user that file modes apply to. SQLite
    // opens such a file read-only without complaint; only a write shows it.
    let db = dir.path().join("paytrace.db");
    for f in ["paytrace.db-wal", "paytrace.db-shm"] {
        let _ = fs::remove_file(dir.path().join(f));
    }
    fs::set_permissions(&db, fs::Permissions::from_mode(0o444)).unwrap();
    let cmd = if is_root() {
        // `nobody` needs to reach the directory and own it (to create the WAL beside the file).
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let chown = Command::new("chown")
            .args(["-R", "65534:65534", dir.path().to_str().unwrap()])
            .status()
            .unwrap();
        assert!(chown.success());
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", binary]);
        c
    } else {
        Command::new(binary)
    };
    let (code, stderr) = serve_refuses(cmd, &db);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains(db.to_str().unwrap()), "{stderr}");
    assert!(stderr.contains("cannot be written"), "{stderr}");
}

/// Writes zeros to `path` until the file system is full.
fn fill(path: &Path) {
    let mut f = fs::File::create(path).unwrap();
    let chunk = vec![0u8; 16 * 1024];
    while f.write_all(&chunk).is_ok() {}
    let one = [0u8; 1];
    while f.write_all(&one).is_ok() {}
    let _ = f.sync_all();
}

/// Makes the server's next write need new disk blocks. SQLite rewinds its WAL to the start
/// after a checkpoint and overwrites the file in place, so a disk can be full while writes still
/// fit in the WAL's old size. The returned reader holds a snapshot, so nothing rewinds the WAL
/// while it lives; then this writes (to a table of its own) until the WAL file grows: its end
/// is the end.
fn pin_the_wal_at_its_end(db: &Path) -> rusqlite::Connection {
    let reader = rusqlite::Connection::open(db).unwrap();
    reader.busy_timeout(Duration::from_secs(5)).unwrap();
    reader.execute_batch("BEGIN").unwrap();
    let _: i64 = reader
        .query_row("SELECT count(*) FROM payments", [], |r| r.get(0))
        .unwrap();
    let writer = rusqlite::Connection::open(db).unwrap();
    writer.busy_timeout(Duration::from_secs(5)).unwrap();
    writer
        .execute_batch("CREATE TABLE IF NOT EXISTS test_pad (value TEXT NOT NULL)")
        .unwrap();
    let wal = db.with_extension("db-wal");
    let size = || fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
    let before = size();
    for _ in 0..10_000 {
        writer
            .execute(
                "INSERT INTO test_pad (value) VALUES (?1)",
                ["x".repeat(1000)],
            )
            .unwrap();
        if size() > before {
            return reader;
        }
    }
    panic!("the WAL never grew");
}

fn ready(serve: &Serve) -> u16 {
    get(&format!("{}/readyz", serve.url())).status
}

#[test]
fn a_full_disk_is_a_503_storage_unavailable_logged_once_and_readiness_fails_until_it_recovers() {
    if !is_root() {
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    }
    let _serial = exclusive();
    let provider = provider(&["--latency", "300ms"]);
    let dir = tempfile::tempdir().unwrap();
    let _tmpfs = Mount::tmpfs(dir.path(), "4m");
    // A short request timeout, so that the lock of the payment that could not be recorded
    // goes stale (request timeout + 1 s) soon and its retry can take it over.
    let mut serve = Serve::start_in(
        dir,
        &[
            "--provider-url",
            &provider.url,
            "--request-timeout",
            "1s",
            "--provider-timeout",
            "500ms",
            "--acquire-timeout",
            "100ms",
            "--write-timeout",
            "100ms",
        ],
    );
    let db_dir = serve.dir.path().to_path_buf();
    let db = db_dir.join("paytrace.db");
    let filler = db_dir.join("filler");
    assert_eq!(pay(serve.url(), "before", &body(100)).status, 201);
    assert_eq!(ready(&serve), 200);

    // The disk fills while the charge is at the provider: the claim was recorded, the outcome
    // cannot be.
    let (r, reader) = thread::scope(|s| {
        let during = s.spawn(|| pay(serve.url(), "during", &body(100)));
        eventually(Duration::from_secs(5), "the claim is recorded", || {
            (provider_stats(&provider.url)["requests"] == 2).then_some(())
        });
        let reader = pin_the_wal_at_its_end(&db);
        fill(&filler);
        (during.join().unwrap(), reader)
    });
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.body["code"], "storage-unavailable");
    assert!(r.header("Retry-After").is_some());
    assert_eq!(r.body["payment"]["status"], "pending", "{}", r.body);
    let id = r.body["payment"]["id"].as_str().unwrap().to_string();
    let request_id = r.header("X-Request-Id").unwrap().to_string();

    // Readiness fails while writes fail; further payments are refused the same way.
    assert_eq!(ready(&serve), 503);
    let next = pay(serve.url(), "while-full", &body(100));
    assert_eq!(next.status, 503, "{}", next.body);
    assert_eq!(next.body["code"], "storage-unavailable");
    assert!(next.body.get("payment").is_none(), "nothing was sent");
    assert_eq!(ready(&serve), 503);

    // The cause is logged once for the incident, with the request id that found it.
    let line = serve
        .proc
        .wait_for_log("storage unavailable", Duration::from_secs(5));
    assert!(line.contains(&request_id), "{line}");
    assert!(line.contains("full"), "{line}");
    let logged = serve.proc.log_text().matches("storage unavailable").count();
    assert_eq!(logged, 1, "{}", serve.proc.log_text());

    // Space again: readiness recovers without a payment having to try, and a retry of the
    // key completes the same payment (the provider made the charge once).
    drop(reader);
    fs::remove_file(&filler).unwrap();
    eventually(Duration::from_secs(5), "readiness recovers", || {
        (ready(&serve) == 200).then_some(())
    });
    serve
        .proc
        .wait_for_log("writes succeed again", Duration::from_secs(1));
    let retry = eventually(Duration::from_secs(10), "the retry completes", || {
        let r = pay(serve.url(), "during", &body(100));
        match r.status {
            // The attempt that could not record its outcome still holds the key until its
            // lock goes stale.
            409 => None,
            _ => Some(r),
        }
    });
    assert_eq!(retry.status, 201, "{}", retry.body);
    assert_eq!(retry.body["id"], id.as_str());
    assert_eq!(provider_stats(&provider.url)["charges"], 2);
}
