//! A real nginx in front of servers this process started, with one of the shipped configs
//! (compiled in; only its listen port and upstream servers replaced): `data/nginx/paytrace.conf`
//! for `paytrace scenario slow-clients`, `data/nginx/paytrace-cluster.conf` for the PostgreSQL
//! rows of `paytrace bench`.

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// The shipped single-server config, as a reader finds it in the repository.
const SHIPPED: &str = include_str!("../../data/nginx/paytrace.conf");
/// The lines of it that name the port nginx listens on and the paytrace it forwards to.
const LISTEN: &str = "listen 127.0.0.1:8000;";
const UPSTREAM: &str = "server 127.0.0.1:8080 max_fails=0;";

/// A foreground nginx and its scratch directory, stopped and removed when dropped.
pub(crate) struct Nginx {
    child: Child,
    dir: PathBuf,
    pub url: String,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The shipped single-server config with nginx listening on `port` and forwarding to
/// `upstream` (`HOST:PORT`); an error if the file no longer has the lines this replaces.
pub(crate) fn config_for(port: u16, upstream: &str) -> Result<String, String> {
    if !SHIPPED.contains(LISTEN) || !SHIPPED.contains(UPSTREAM) {
        return Err(format!(
            "data/nginx/paytrace.conf no longer has `{LISTEN}` and `{UPSTREAM}`"
        ));
    }
    Ok(SHIPPED
        .replace(LISTEN, &format!("listen 127.0.0.1:{port};"))
        .replace(UPSTREAM, &format!("server {upstream} max_fails=0;")))
}

impl Nginx {
    /// Starts nginx (from `PATH`) in front of the paytrace at `upstream` (`http://HOST:PORT`)
    /// with the shipped single-server config.
    pub(crate) fn single(upstream: &str) -> Result<Nginx, String> {
        Nginx::start(|port| config_for(port, upstream.trim_start_matches("http://")))
    }

    /// Starts nginx (from `PATH`) with the config `config` makes for a free loopback port, and
    /// waits (at most 10 s) until it accepts connections.
    pub(crate) fn start(
        config: impl FnOnce(u16) -> Result<String, String>,
    ) -> Result<Nginx, String> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("no free port for nginx: {e}"))?
            .port();
        let config = config(port)?;
        let dir =
            std::env::temp_dir().join(format!("paytrace-nginx-{:08x}", rand::random::<u32>()));
        for sub in ["logs", "temp"] {
            std::fs::create_dir_all(dir.join(sub)).map_err(|e| e.to_string())?;
        }
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, config).map_err(|e| e.to_string())?;
        let child = Command::new("nginx")
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&conf)
            // One foreground process that keeps this user: enough for a run of this process.
            .args(["-g", "daemon off; master_process off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start nginx (is it installed?): {e}"))?;
        let nginx = Nginx {
            child,
            dir,
            url: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() >= deadline {
                return Err(format!(
                    "nginx did not listen on 127.0.0.1:{port} within 10 s"
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(nginx)
    }
}

/// Whether an `nginx` can be run here.
pub(crate) fn installed() -> bool {
    Command::new("nginx")
        .arg("-v")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_config_is_used_with_only_its_port_and_upstream_replaced() {
        let c = config_for(18000, "127.0.0.1:18080").unwrap();
        assert!(c.contains("listen 127.0.0.1:18000;"));
        assert!(c.contains("server 127.0.0.1:18080 max_fails=0;"));
        assert!(!c.contains(LISTEN) && !c.contains(UPSTREAM));
        assert_eq!(
            c.lines().count(),
            SHIPPED.lines().count(),
            "nothing else changed"
        );
    }
}
