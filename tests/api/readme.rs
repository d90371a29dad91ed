//! Every shell example of README.md runs as written, and says what it promises.
//!
//! Each ```` ```sh ````, ```` ```bash ```` and ```` ```console ```` block is extracted and run
//! with `bash` (no `-e`: as if pasted into a terminal), one block after another, each in a
//! fresh temporary directory, with at most [`BLOCK_LIMIT`] of time. The conventions the
//! README's blocks follow, and this test enforces:
//!
//! - **Commands.** A logical line (physical lines joined at a trailing `\`) is one command.
//! - **Expectations.** A command may end with a comment `# → ITEMS`, optionally followed by
//!   ` — ` and prose. `ITEMS` is a comma-separated list of:
//!   - `201` (exactly one answer with that status), `502 ×5` (exactly five), `201 ×4..8`
//!     (between four and eight). Statuses are read from the command's output: a status line
//!     `HTTP/1.1 201 Created`, or a line starting with the three digits (`curl -w
//!     '%{http_code}'`). When any status item is given, the statuses seen must be exactly the
//!     ones listed, no others;
//!   - `` `text` `` or `"text"`: the command's output contains `text`;
//!   - ``!`text` `` or `!"text"`: it does not.
//!
//!   Every `curl` command whose output is shown (a line starting with `curl`) carries one.
//! - **Servers.** A block that needs the reader's server says so on its first line,
//!   `# In another shell: paytrace serve`; the test starts that command (in the block's
//!   directory, on the block's port for 8080 when it names no `--addr`) and waits for it to
//!   listen. Every other server a block uses, the block starts itself (`… & S=$!`), waits for
//!   with `curl` in a loop bounded by `timeout`, and stops with `kill` before it ends: after
//!   the block, no process it started may be left (checked by process group). So no block
//!   depends on what an earlier block left running or set (faults, breaker state).
//! - **Ports.** Only `127.0.0.1` is ever contacted (no `localhost`, which may try `::1`
//!   first). A port a block starts a server on is used by no other block, and is never 8080
//!   (the reader's `paytrace serve` from the first lines). To run next to a developer's own
//!   server and next to another run of this test, the test maps each port of a block to a
//!   free one before running it; that is the only change made to a block's text.
//! - **The binary.** Blocks call `paytrace`. The README puts the release build on the PATH
//!   once per shell (`cargo build --release && export PATH=…`); the test instead puts the
//!   binary `cargo test` built first on the PATH, so the examples run without a release build
//!   (a release build from scratch takes minutes on two cores, the whole test ≈1 minute).
//!   `paytrace bench` runs with `PAYTRACE_BENCH_DURATION=1s` (its 5 s default times ten loads —
//!   seven scenarios and three provider-alone runs — would dominate the test; only that it runs
//!   and prints its table is checked).
//! - **Exempt.** Blocks made only of `cargo …` commands and the `export PATH=…` line are not
//!   run: `cargo run --release -- serve`, `cargo test`, `cargo build --release` are what CI
//!   itself runs. The test checks that exactly those blocks are exempt.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::helpers::*;

const README: &str = include_str!("../../README.md");
const BLOCK_LIMIT: Duration = Duration::from_secs(120);
const ANOTHER_SHELL: &str = "# In another shell: ";

#[derive(Debug)]
struct Block {
    /// 1-based line of the opening fence in README.md.
    line: usize,
    text: String,
}

fn blocks() -> Vec<Block> {
    let mut out = Vec::new();
    let mut current: Option<Block> = None;
    for (i, l) in README.lines().enumerate() {
        match &mut current {
            None => {
                let lang = l.trim_start().strip_prefix("```");
                if let Some(lang) = lang
                    && matches!(lang.trim(), "sh" | "bash" | "console")
                {
                    current = Some(Block {
                        line: i + 1,
                        text: String::new(),
                    });
                }
            }
            Some(b) => {
                if l.trim_start().starts_with("```") {
                    out.push(current.take().unwrap());
                } else {
                    b.text.push_str(l);
                    b.text.push('\n');
                }
            }
        }
    }
    assert!(current.is_none(), "an unclosed ``` block in README.md");
    out
}

/// Logical lines (joined at a trailing backslash) that are not blank or only a comment.
fn commands(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut pending = String::new();
    for l in text.lines() {
        if let Some(head) = l.strip_suffix('\\') {
            pending.push_str(head);
            pending.push(' ');
            continue;
        }
        pending.push_str(l);
        let cmd = std::mem::take(&mut pending);
        let t = cmd.trim();
        if !t.is_empty() && !t.starts_with('#') {
            out.push(cmd);
        }
    }
    out
}

fn is_exempt(b: &Block) -> bool {
    commands(&b.text).iter().all(|c| {
        let c = c.trim();
        c.starts_with("cargo ") || c.starts_with("export PATH=")
    })
}

#[derive(Debug, PartialEq)]
enum Expect {
    Status { code: u16, min: usize, max: usize },
    Contains(String),
    Absent(String),
}

/// The `# → …` expectations of one command, if it has any.
fn expectations(cmd: &str) -> Result<Option<Vec<Expect>>, String> {
    let Some((_, spec)) = cmd.split_once(" # → ") else {
        return Ok(None);
    };
    let spec = spec.split(" — ").next().unwrap_or("").trim();
    let mut items = Vec::new();
    let mut rest = spec;
    while !rest.is_empty() {
        let negated = rest.starts_with('!');
        let body = rest.trim_start_matches('!');
        let quote = body.chars().next().filter(|c| *c == '`' || *c == '"');
        if let Some(q) = quote {
            let inner = &body[1..];
            let end = inner
                .find(q)
                .ok_or_else(|| format!("unclosed {q} in `{spec}`"))?;
            let text = inner[..end].to_string();
            items.push(if negated {
                Expect::Absent(text)
            } else {
                Expect::Contains(text)
            });
            rest = inner[end + 1..].trim_start();
        } else {
            let end = body.find(',').unwrap_or(body.len());
            let item = body[..end].trim();
            let (code, count) = match item.split_once('×') {
                Some((c, n)) => (c.trim(), Some(n.trim())),
                None => (item, None),
            };
            let code: u16 = code
                .parse()
                .ok()
                .filter(|c| (100..600).contains(c))
                .ok_or_else(|| format!("`{item}` is not a status in `{spec}`"))?;
            let (min, max) = match count {
                None => (1, 1),
                Some(n) => match n.split_once("..") {
                    Some((a, b)) => (
                        a.parse().map_err(|_| format!("bad count `{n}`"))?,
                        b.parse().map_err(|_| format!("bad count `{n}`"))?,
                    ),
                    None => {
                        let n: usize = n.parse().map_err(|_| format!("bad count `{n}`"))?;
                        (n, n)
                    }
                },
            };
            items.push(Expect::Status { code, min, max });
            rest = &body[end..];
        }
        rest = rest.trim_start().trim_start_matches(',').trim_start();
    }
    if items.is_empty() {
        return Err(format!("`# →` with nothing after it: `{cmd}`"));
    }
    Ok(Some(items))
}

/// The statuses a command printed, in order.
fn statuses(output: &str) -> Vec<u16> {
    output
        .lines()
        .filter_map(|l| {
            let l = l.trim_end_matches('\r');
            let token = if l.starts_with("HTTP/") {
                l.split_whitespace().nth(1)?
            } else {
                let t = l.split_whitespace().next()?;
                (t.len() == 3).then_some(t)?
            };
            token.parse().ok().filter(|c| (100..600).contains(c))
        })
        .collect()
}

fn check(expect: &[Expect], output: &str) -> Result<(), String> {
    let seen = statuses(output);
    let mut counts: BTreeMap<u16, usize> = BTreeMap::new();
    for s in &seen {
        *counts.entry(*s).or_default() += 1;
    }
    let mut listed = BTreeSet::new();
    for e in expect {
        match e {
            Expect::Status { code, min, max } => {
                listed.insert(*code);
                let n = counts.get(code).copied().unwrap_or(0);
                if n < *min || n > *max {
                    return Err(format!(
                        "expected {code} ×{min}..{max}, saw it {n} times (statuses {seen:?})"
                    ));
                }
            }
            Expect::Contains(t) if !output.contains(t.as_str()) => {
                return Err(format!("expected the output to contain `{t}`"));
            }
            Expect::Absent(t) if output.contains(t.as_str()) => {
                return Err(format!("expected the output not to contain `{t}`"));
            }
            _ => {}
        }
    }
    if !listed.is_empty()
        && let Some(other) = seen.iter().find(|s| !listed.contains(s))
    {
        return Err(format!("unexpected status {other} (statuses {seen:?})"));
    }
    Ok(())
}

/// `127.0.0.1:PORT` occurrences of a text, in order.
fn ports(text: &str) -> Vec<u16> {
    ports_after(text, "127.0.0.1:")
}

/// Ports a block starts a server on (`--addr 127.0.0.1:PORT`).
fn started_ports(text: &str) -> Vec<u16> {
    ports_after(text, "--addr 127.0.0.1:")
}

/// The port numbers that follow each occurrence of `prefix`.
fn ports_after(text: &str, prefix: &str) -> Vec<u16> {
    text.match_indices(prefix)
        .filter_map(|(i, m)| {
            let digits: String = text[i + m.len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse().ok()
        })
        .collect()
}

fn free_port() -> u16 {
    dead_addr().port()
}

/// The static rules: loopback only, ports of started servers unique and never 8080, every
/// port a block uses either started by it or the reader's 8080, every shown curl checked.
fn lint(all: &[Block]) -> Vec<String> {
    let mut problems = Vec::new();
    let mut owners: BTreeMap<u16, usize> = BTreeMap::new();
    for b in all.iter().filter(|b| !is_exempt(b)) {
        let at = |m: String| format!("README.md:{}: {m}", b.line);
        if b.text.contains("localhost") {
            problems.push(at("use 127.0.0.1, not localhost".into()));
        }
        for (i, _) in b.text.match_indices("://") {
            if !b.text[i + 3..].starts_with("127.0.0.1:") {
                problems.push(at("a URL that is not http://127.0.0.1:PORT".into()));
            }
        }
        let started = started_ports(&b.text);
        let needs_reader = b.text.starts_with(ANOTHER_SHELL);
        for p in &started {
            if *p == 8080 {
                problems.push(at(
                    "starts a server on 8080, the reader's `paytrace serve`".into()
                ));
            }
            if let Some(other) = owners.insert(*p, b.line) {
                problems.push(at(format!("port {p} is also started at README.md:{other}")));
            }
        }
        for p in ports(&b.text) {
            let readers = p == 8080 && needs_reader;
            if !(started.contains(&p) || readers) {
                problems.push(at(format!(
                    "uses port {p}, which it does not start (and is not the reader's 8080)"
                )));
            }
        }
        let cmds = commands(&b.text);
        if cmds.is_empty() {
            problems.push(at("no command".into()));
        }
        let mut checked = 0;
        for c in &cmds {
            match expectations(c) {
                Err(e) => problems.push(at(e)),
                Ok(Some(_)) => checked += 1,
                Ok(None) if c.trim_start().starts_with("curl ") => {
                    problems.push(at(format!("a curl without `# →`: {}", c.trim())))
                }
                Ok(None) => {}
            }
        }
        if checked == 0 {
            problems.push(at(
                "no `# →` expectation: nothing it promises is checked".into()
            ));
        }
    }
    problems
}

/// Processes whose process group is `pgid`, from /proc.
fn group_members(pgid: u32) -> Vec<(u32, String)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let (head, tail) = stat.rsplit_once(')')?;
        let fields: Vec<&str> = tail.split_whitespace().collect();
        // After the command: state, ppid, pgrp.
        let pgrp: u32 = fields.get(2)?.parse().ok()?;
        let state = fields.first()?;
        let name = head
            .split_once('(')
            .map(|(_, n)| n.to_string())
            .unwrap_or_default();
        (pgrp == pgid && *state != "Z").then_some((pid, name))
    })
    .collect()
}

fn kill_group(pgid: u32) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{pgid}")])
        .stderr(Stdio::null())
        .status();
}

struct Run {
    /// stdout split at the markers: the output of command `i` is `outputs[i]`.
    outputs: Vec<String>,
    stderr: String,
    elapsed: Duration,
}

/// Runs one block (ports already mapped) in `dir`; `Err` if it overran or left processes.
fn run_block(script: &str, cmds: usize, dir: &std::path::Path) -> Result<Run, String> {
    let exe = std::path::Path::new(env!("CARGO_BIN_EXE_paytrace"));
    let path = format!(
        "{}:{}",
        exe.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = Command::new("bash");
    cmd.args(["--noprofile", "--norc", "-c", script])
        .current_dir(dir)
        .env("PATH", path)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    for (k, _) in std::env::vars() {
        if k.starts_with("PAYTRACE_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("PAYTRACE_BENCH_DURATION", "1s");
    let started = Instant::now();
    let mut child = cmd.spawn().map_err(|e| format!("bash: {e}"))?;
    let pgid = child.id();
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let mut problem = None;
    loop {
        if child.try_wait().ok().flatten().is_some() {
            break;
        }
        if started.elapsed() > BLOCK_LIMIT {
            problem = Some(format!("did not finish within {BLOCK_LIMIT:?}"));
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let elapsed = started.elapsed();
    // A process the block started and did not stop (the shell itself is gone by now).
    let left = group_members(pgid);
    if problem.is_none() && !left.is_empty() {
        problem = Some(format!("left processes behind: {left:?}"));
    }
    kill_group(pgid);
    let _ = child.wait();
    let stdout = out_reader.join().unwrap();
    let stderr = err_reader.join().unwrap();
    if let Some(p) = problem {
        return Err(format!("{p}\n--- stdout\n{stdout}\n--- stderr\n{stderr}"));
    }
    let mut outputs = vec![String::new(); cmds];
    let mut current: Option<usize> = None;
    for l in stdout.lines() {
        if let Some(n) = l.strip_prefix("@@readme-cmd ") {
            current = n.trim().parse().ok();
            continue;
        }
        if let Some(i) = current {
            outputs[i].push_str(l);
            outputs[i].push('\n');
        }
    }
    Ok(Run {
        outputs,
        stderr,
        elapsed,
    })
}

/// The block's text with every port mapped, a marker echoed before each command.
fn instrument(text: &str, map: &BTreeMap<u16, u16>) -> (String, Vec<String>) {
    let mut mapped = text.to_string();
    // Longest-first is not needed: every occurrence is `127.0.0.1:` + the whole number.
    let mut out = String::new();
    let mut rest = mapped.as_str();
    while let Some(i) = rest.find("127.0.0.1:") {
        let after = &rest[i + 10..];
        let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
        out.push_str(&rest[..i + 10]);
        match digits.parse::<u16>().ok().and_then(|p| map.get(&p)) {
            Some(p) => out.push_str(&p.to_string()),
            None => out.push_str(&digits),
        }
        rest = &after[digits.len()..];
    }
    out.push_str(rest);
    mapped = out;
    let mut script = String::new();
    let mut cmds = Vec::new();
    let mut pending = String::new();
    let mut pending_raw = String::new();
    for l in mapped.lines() {
        pending_raw.push_str(l);
        pending_raw.push('\n');
        if let Some(head) = l.strip_suffix('\\') {
            pending.push_str(head);
            pending.push(' ');
            continue;
        }
        pending.push_str(l);
        let cmd = std::mem::take(&mut pending);
        let raw = std::mem::take(&mut pending_raw);
        let t = cmd.trim();
        if !t.is_empty() && !t.starts_with('#') {
            // A leading newline: the previous command's output may not end with one.
            script.push_str(&format!("printf '\\n@@readme-cmd {}\\n'\n", cmds.len()));
            cmds.push(cmd);
        }
        script.push_str(&raw);
    }
    script.push_str("printf '\\n@@readme-cmd -\\n'\n");
    (script, cmds)
}

#[test]
fn the_conventions_parse() {
    assert_eq!(
        expectations("curl x # → 502 ×5, 503 ×10..12 — then fast").unwrap(),
        Some(vec![
            Expect::Status {
                code: 502,
                min: 5,
                max: 5
            },
            Expect::Status {
                code: 503,
                min: 10,
                max: 12
            },
        ])
    );
    assert_eq!(
        expectations("x # → 201, `Idempotent-Replayed: true`, !\"429\"").unwrap(),
        Some(vec![
            Expect::Status {
                code: 201,
                min: 1,
                max: 1
            },
            Expect::Contains("Idempotent-Replayed: true".into()),
            Expect::Absent("429".into()),
        ])
    );
    assert!(expectations("x # → banana").is_err());
    assert_eq!(expectations("curl x").unwrap(), None);
    let out = "HTTP/1.1 201 Created\r\nX: y\r\n\r\n{}\n503 0.002s\n{\"amount\":201}\n";
    assert_eq!(statuses(out), vec![201, 503]);
    let ok = expectations("x # → 201, 503").unwrap().unwrap();
    assert_eq!(check(&ok, out), Ok(()));
    let strict = expectations("x # → 201").unwrap().unwrap();
    assert!(check(&strict, out).is_err(), "an unlisted status fails");
    assert_eq!(
        started_ports("a --addr 127.0.0.1:9091 --url http://127.0.0.1:8081"),
        vec![9091]
    );
    assert_eq!(commands("# c\na \\\n  b # → 201\n\nc\n").len(), 2);
}

#[test]
fn every_readme_block_runs_as_written() {
    let _serial = exclusive();
    let all = blocks();
    let exempt: Vec<String> = all
        .iter()
        .filter(|b| is_exempt(b))
        .flat_map(|b| commands(&b.text))
        .map(|c| c.split(" #").next().unwrap_or("").trim().to_string())
        .collect();
    assert_eq!(
        exempt,
        [
            "cargo run --release -- serve",
            "cargo test",
            "cargo build --release && export PATH=\"${CARGO_TARGET_DIR:-$PWD/target}/release:$PATH\"",
        ],
        "only the cargo commands CI runs itself are exempt"
    );
    let problems = lint(&all);
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    let mut failures = Vec::new();
    for b in all.iter().filter(|b| !is_exempt(b)) {
        let dir = tempfile::tempdir().unwrap();
        let mut map = BTreeMap::new();
        for p in ports(&b.text) {
            map.entry(p).or_insert_with(free_port);
        }
        // The reader's server, when the block needs one.
        let _reader = b.text.strip_prefix(ANOTHER_SHELL).map(|rest| {
            let line = rest.lines().next().unwrap_or("");
            let mut args: Vec<String> = line
                .split_whitespace()
                .skip(1) // `paytrace`
                .map(str::to_string)
                .collect();
            if !args.iter().any(|a| a == "--addr") {
                let port = *map.entry(8080).or_insert_with(free_port);
                args.extend(["--addr".into(), format!("127.0.0.1:{port}")]);
            }
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_paytrace"));
            cmd.current_dir(dir.path());
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            Proc::start_with(cmd, &args)
        });
        let (script, cmds) = instrument(&b.text, &map);
        let run = match run_block(&script, cmds.len(), dir.path()) {
            Ok(r) => r,
            Err(e) => {
                failures.push(format!("README.md:{}: {e}", b.line));
                continue;
            }
        };
        for bad in ["command not found", "syntax error", "No such file"] {
            if run.stderr.contains(bad) {
                failures.push(format!(
                    "README.md:{}: `{bad}` on stderr:\n{}",
                    b.line, run.stderr
                ));
            }
        }
        for (i, c) in cmds.iter().enumerate() {
            if let Some(expect) = expectations(c).unwrap()
                && let Err(e) = check(&expect, &run.outputs[i])
            {
                failures.push(format!(
                    "README.md:{}: {e}\n  command: {}\n  output:\n{}\n  stderr:\n{}",
                    b.line,
                    c.trim(),
                    run.outputs[i],
                    run.stderr
                ));
            }
        }
        eprintln!("README.md:{} ran in {:?}", b.line, run.elapsed);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
