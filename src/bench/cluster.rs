//! `paytrace bench --db postgres://USER@HOST:PORT/DB`: payments on one PostgreSQL database,
//! one instance against three behind nginx (the shipped `data/nginx/paytrace-cluster.conf`), in
//! the same run against the same simulated provider. On a machine with few cores three
//! instances are not three machines: each row says how much of the CPU it kept busy and the
//! payments per busy core, which is what can be compared, rather than a speed-up.

use std::time::Duration;

use serde_json::{Value, json};

use super::nginx::Nginx;
use super::{BenchConfig, Proc, cpu_jiffies, spawn};
use crate::load::{self, LoadConfig};

/// The cluster config, as shipped; its listen address and upstream servers are replaced.
const CLUSTER_CONF: &str = include_str!("../../data/nginx/paytrace-cluster.conf");

/// Provider latency for every row: a payment holds a worker for about this long.
const PROVIDER_LATENCY_MS: u64 = 50;
/// Clients for every row.
const CLIENTS: u32 = 64;

/// The shipped cluster config listening on `port`, with `upstreams` as its servers.
fn cluster_conf(port: u16, upstreams: &[String]) -> Result<String, String> {
    let mut conf = CLUSTER_CONF.replace(
        "listen 127.0.0.1:8000;",
        &format!("listen 127.0.0.1:{port};"),
    );
    for slot in 1..=3 {
        let line = format!("        server 127.0.0.1:808{slot} max_fails=1 fail_timeout=2s;\n");
        let with = match upstreams.get(slot - 1) {
            Some(addr) => format!("        server {addr} max_fails=1 fail_timeout=2s;\n"),
            None => String::new(),
        };
        if !conf.contains(&line) {
            return Err("data/nginx/paytrace-cluster.conf changed its upstream lines".into());
        }
        conf = conf.replace(&line, &with);
    }
    Ok(conf)
}

/// One row: `instances` servers on `db`, behind nginx or not.
fn row(
    config: &BenchConfig,
    db: &str,
    provider: &str,
    instances: usize,
    behind_nginx: bool,
) -> Result<Value, String> {
    let name = format!(
        "POST /payments, provider {PROVIDER_LATENCY_MS} ms, PostgreSQL, {instances} instance{}{}",
        if instances == 1 { "" } else { "s" },
        if behind_nginx { " behind nginx" } else { "" }
    );
    eprintln!("bench: {name} …");
    let servers = (0..instances)
        .map(|_| {
            spawn(&[
                "serve".into(),
                "--addr".into(),
                "127.0.0.1:0".into(),
                "--db".into(),
                db.into(),
                "--provider-url".into(),
                provider.into(),
                "--rate-limit".into(),
                "1000000/s".into(),
                "--queue".into(),
                "1024".into(),
            ])
        })
        .collect::<Result<Vec<Proc>, String>>()?;
    let front = if behind_nginx {
        let upstreams: Vec<String> = servers
            .iter()
            .map(|s| s.1.trim_start_matches("http://").to_string())
            .collect();
        Some(Nginx::start(|port| cluster_conf(port, &upstreams))?)
    } else {
        None
    };
    let url = match &front {
        Some(nginx) => nginx.url.clone(),
        None => servers[0].1.clone(),
    };
    let cpu_before = cpu_jiffies();
    let summary = load::execute(
        &LoadConfig {
            url,
            api_key: crate::config::DEV_API_KEY.into(),
            concurrency: CLIENTS,
            duration: Some(config.duration),
            requests: None,
            rate: None,
            replay_fraction: 0.0,
            path: "/payments".into(),
            timeout: Duration::from_secs(10),
            json: true,
        },
        false,
    )
    .map_err(|e| format!("{name}: {e}"))?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let busy = match (cpu_before, cpu_jiffies()) {
        (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => (b1 - b0) as f64 / (t1 - t0) as f64,
        _ => f64::NAN,
    };
    let throughput = summary["throughput"].as_f64().unwrap_or(0.0);
    let requests = summary["requests"].as_u64().unwrap_or(0);
    let created = summary["status"]["201"].as_u64().unwrap_or(0);
    drop(front);
    drop(servers);
    Ok(json!({
        "scenario": name,
        "instances": instances,
        "throughput": throughput,
        "p50_ms": summary["latency_ms"]["p50"],
        "p99_ms": summary["latency_ms"]["p99"],
        "cpu_busy_pct": (busy * 100.0).round(),
        "per_busy_core": (throughput / (busy * cores) * 10.0).round() / 10.0,
        "requests": requests,
        "non_201": requests - created,
    }))
}

/// The PostgreSQL rows: one instance direct, one behind nginx, three behind nginx.
pub fn run(config: &BenchConfig, db: &str) -> Result<(), String> {
    if !crate::store::pg::is_url(db) {
        return Err(format!(
            "--db {db}: the bench takes a postgres://USER@HOST:PORT/DB URL (its SQLite rows use temporary files)"
        ));
    }
    let provider = spawn(&[
        "provider".into(),
        "--addr".into(),
        "127.0.0.1:0".into(),
        "--latency".into(),
        format!("{PROVIDER_LATENCY_MS}ms"),
    ])?;
    let rows = vec![
        row(config, db, &provider.1, 1, false)?,
        row(config, db, &provider.1, 1, true)?,
        row(config, db, &provider.1, 3, true)?,
    ];
    if config.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&Value::Array(rows)).unwrap_or_default()
        );
        return Ok(());
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "| scenario ({} each, {CLIENTS} clients, closed loop, {cores} cores) | req/s | p50 ms | p99 ms | CPU busy % | req/s per busy core | non-201 |",
        humantime::format_duration(config.duration)
    );
    println!("|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {:.0} | {} | {} | {} | {} | {} |",
            r["scenario"].as_str().unwrap_or(""),
            r["throughput"].as_f64().unwrap_or(0.0),
            r["p50_ms"],
            r["p99_ms"],
            r["cpu_busy_pct"],
            r["per_busy_core"],
            r["non_201"]
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_cluster_config_takes_one_to_three_upstreams() {
        let one = cluster_conf(9999, &["127.0.0.1:1111".into()]).unwrap();
        assert!(one.contains("listen 127.0.0.1:9999;"));
        assert!(one.contains("server 127.0.0.1:1111 max_fails=1"));
        assert!(!one.contains("server 127.0.0.1:808"));
        let three = cluster_conf(
            9999,
            &[
                "127.0.0.1:1".into(),
                "127.0.0.1:2".into(),
                "127.0.0.1:3".into(),
            ],
        )
        .unwrap();
        assert_eq!(three.matches("max_fails=1 fail_timeout=2s;").count(), 3);
        assert!(three.contains("least_conn;"));
    }
}
