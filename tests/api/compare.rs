//! `paytrace bench --compare`: the sync server and its async twin measured in one run.

use std::path::Path;
use std::process::{Command, Output};

/// `exe bench --compare` on the /healthz row only, for one second, with `more` flags.
fn compare_healthz(exe: &Path, more: &[&str]) -> Output {
    Command::new(exe)
        .args([
            "bench",
            "--compare",
            "--only",
            "healthz",
            "--duration",
            "1s",
        ])
        .args(more)
        .output()
        .unwrap()
}

/// Without the twin next to the binary, it says how to build it instead of measuring one side.
#[test]
fn compare_without_the_twin_beside_it_says_how_to_build_it() {
    // A hard link in a directory of its own: the binary finds itself there (/proc/self/exe),
    // with no twin beside it.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let alone = dir.path().join("paytrace");
    std::fs::hard_link(env!("CARGO_BIN_EXE_paytrace"), &alone).unwrap();
    let out = compare_healthz(&alone, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("needs the async twin") && err.contains("--features async-twin"),
        "{err}"
    );
}

/// Both servers answer the same scenario in one run, and the table row tells them apart.
#[cfg(feature = "async-twin")]
#[test]
fn compare_measures_both_servers_in_one_run() {
    use serde_json::Value;

    let _serial = crate::helpers::exclusive();
    // Built with the feature, cargo puts the twin beside `paytrace`, where --compare looks.
    let out = compare_healthz(Path::new(env!("CARGO_BIN_EXE_paytrace")), &["--json"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let rows: Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    let row = &rows[0];
    assert_eq!(row["scenario"], "GET /healthz");
    for side in ["sync", "async"] {
        assert!(row[side]["ok_per_s"].as_f64().unwrap() > 0.0, "{row}");
        assert_eq!(row[side]["non_2xx"].as_f64(), Some(0.0), "{row}");
    }
    // The sync server holds a thread per worker and per connection; the twin a few.
    assert!(
        row["sync"]["peak_threads"].as_f64().unwrap()
            > row["async"]["peak_threads"].as_f64().unwrap(),
        "{row}"
    );
}
