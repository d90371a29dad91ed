//! The command line as a user meets it: a wrong flag or an unreachable server is one clear
//! line on stderr and an exit code that says which (2: the command line, 1: at run time), and
//! each env var means one thing in every subcommand.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::helpers::*;

fn paytrace(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_paytrace"));
    cmd.args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("PAYTRACE_") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("paytrace runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

#[test]
fn load_against_a_dead_port_says_so_and_exits_1() {
    let url = format!("http://{}", dead_addr());
    let t = Instant::now();
    let out = paytrace(&["load", "--url", &url, "--duration", "2s"], &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("cannot connect to --url {url}")) && err.contains("refused"),
        "{err}"
    );
    assert!(
        out.stdout.is_empty(),
        "no summary of a run that did not happen"
    );
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "it does not spin for the duration"
    );
}

#[test]
fn load_with_a_url_without_its_scheme_is_a_usage_error() {
    let out = paytrace(&["load", "--url", "127.0.0.1:8080", "--requests", "5"], &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--url") && err.contains("must start with http:// or https://"),
        "{err}"
    );
}

#[test]
fn durations_are_named_by_their_flag_and_zero_is_refused() {
    let out = paytrace(&["load", "--duration", "banana"], &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--duration") && err.contains("`banana` is not a duration like 250ms or 3s"),
        "{err}"
    );
    assert!(!err.contains("expected number"), "{err}");

    for args in [
        &["bench", "--duration", "0s"][..],
        &["load", "--duration", "0s"][..],
        &["load", "--timeout", "0ms"][..],
    ] {
        let out = paytrace(args, &[]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains(&format!("'{}", args[1])) && err.contains("must be longer than zero"),
            "{args:?}: {err}"
        );
        assert!(out.stdout.is_empty(), "{args:?} printed a table");
    }
    let out = paytrace(&["bench", "--duration", "0s"], &[]);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("null"));
}

#[test]
fn the_servers_address_variable_does_not_move_the_provider() {
    // PAYTRACE_ADDR is `serve`'s: a provider started from the same shell ignores it.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap().to_string();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_paytrace"));
    cmd.env("PAYTRACE_ADDR", &taken_addr)
        .env("PAYTRACE_PROVIDER_ADDR", "127.0.0.1:0");
    let provider = Proc::start_with(cmd, &["provider"]);
    assert_ne!(provider.addr.to_string(), taken_addr);
    assert_eq!(
        get(&format!("{}/v1/stats", provider.url)).status,
        200,
        "the provider listens where PAYTRACE_PROVIDER_ADDR said"
    );
}

#[test]
fn load_on_the_providers_charges_measures_the_provider_alone() {
    // What the bench's `provider alone` column runs: fresh charges straight at the provider.
    let provider = provider(&["--latency", "0ms"]);
    let load = |more: &[&str]| {
        let mut args = vec![
            "load",
            "--url",
            &provider.url,
            "--path",
            "/v1/charges",
            "--json",
        ];
        args.extend_from_slice(more);
        let out = paytrace(&args, &[]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        summary
    };
    let summary = load(&["--requests", "12", "--concurrency", "3"]);
    assert_eq!(summary["status"]["200"], 12, "{summary}");
    let stats = provider_stats(&provider.url);
    assert_eq!(stats["succeeded"], 12, "one charge per request: {stats}");
    assert_eq!(stats["replays"], 0, "every key was fresh: {stats}");

    // Replays repeat keys the provider charged (200), as they repeat paid payments (201).
    load(&[
        "--requests",
        "40",
        "--concurrency",
        "1",
        "--replay-fraction",
        "0.5",
    ]);
    let stats = provider_stats(&provider.url);
    let (charged, replays) = (
        stats["succeeded"].as_u64().unwrap(),
        stats["replays"].as_u64().unwrap(),
    );
    assert_eq!(charged - 12 + replays, 40, "{stats}");
    assert!(
        replays > 0,
        "half the requests replay a charged key: {stats}"
    );
}

#[test]
fn paytrace_api_key_means_the_servers_keys_for_serve_and_for_load() {
    let keys = "sk_test_one,sk_test_two";
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("p.db");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_paytrace"));
    cmd.env("PAYTRACE_API_KEY", keys);
    let serve = Proc::start_with(
        cmd,
        &[
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--db",
            db.to_str().unwrap(),
            "--rate-limit",
            "10000/s",
        ],
    );
    let out = paytrace(
        &["load", "--requests", "6", "--concurrency", "2", "--json"],
        &[
            ("PAYTRACE_API_KEY", keys),
            ("PAYTRACE_LOAD_URL", &serve.url),
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["status"]["201"], 6, "{summary}");
    // The dev key is not accepted once keys are configured, so the 201s used the first key.
    assert_eq!(pay_as(&serve.url, KEY, "k", &body(100)).status, 401);
}
