//! The layout stays readable: no module of `src/` imports itself around a loop, and the
//! repository's top level holds only what a reader expects.
//!
//! Why loops matter here: a student follows the arrows of the request path one way
//! (`edge::dispatch` → `edge::routes` → `flow::payment` → …). When two modules import each other, neither can
//! be read, tested or moved without the other, and the arrows stop telling the story.
//!
//! How the module graph is read — plain text, no compiler:
//!
//! - **Modules.** Every `.rs` file under `src/` is a module of the library: `src/lib.rs` is the
//!   crate root (shown as `crate`), `src/a.rs` and `src/a/mod.rs` are `a`, `src/a/b.rs` is
//!   `a::b`. `src/main.rs` and `src/bin/**` are skipped: they are separate crates that only
//!   use the library (`paytrace::…`), and nothing can import them, so they cannot be on a loop.
//! - **Dependencies.** Every path in the code that names something of this crate is a
//!   dependency: `crate::a::b::…`, `super::…` and `self::…` (resolved from the module, or from
//!   the inline `mod x { … }` it sits in), and a path that starts at a child module declared in
//!   the same file (`use client::X;` in `provider/mod.rs`). Grouped `use crate::{a::X, b::{self,
//!   Y}}` counts once per member. A path is resolved to the longest prefix that names a module:
//!   `crate::store::db::Db` → `store::db`, `crate::provider::client::ProviderClient` → `provider::client`.
//! - **Not dependencies.** Comments (doc links included) and string literals; declaring a child
//!   (`pub mod client;`), which is not importing it; a module naming itself; and everything
//!   inside a test-only inline module (`#[cfg(test)] mod tests { … }`), since tests may import
//!   anything.
//! - **Loops.** Modules that reach each other through their dependencies form a group (a
//!   strongly connected component). For each group the test prints loops (`a → b → a`) until
//!   every dependency inside the group is on one of them, each with the file and line of one
//!   reference that creates it: that is the line to change, by moving what both sides need
//!   below both.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs;
use std::path::Path;

/// A module of the library, as its path below the crate root: `[]` is `src/lib.rs`,
/// `["provider", "client"]` is `src/provider/client.rs`.
type ModPath = Vec<String>;

/// The module graph: for each module, the modules it depends on, each with the first place in
/// the source that creates the dependency (`src/app.rs:18`).
type Graph = BTreeMap<ModPath, BTreeMap<ModPath, String>>;

/// What the repository's top level holds. Also present, and not checked: `target` (build
/// output) and other entries starting with a dot (`.git`, `.gitignore`: tools' state).
const TOP_LEVEL: [&str; 7] = [
    ".ci",
    "Cargo.lock",
    "Cargo.toml",
    "README.md",
    "data",
    "src",
    "tests",
];

#[test]
fn no_module_of_src_imports_itself_around_a_loop() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    read_library_files(root, Path::new("src"), &mut files);
    assert!(
        files.iter().any(|(module, _, _)| module.is_empty()),
        "src/lib.rs was not read: is the walk looking in the right place?"
    );
    let graph = module_graph(&files);
    assert!(
        graph.values().any(|deps| !deps.is_empty()),
        "no module of src/ depends on any other: the parser is broken, not the tree"
    );
    let report = describe_loops(&graph);
    assert!(report.is_empty(), "{report}");
}

#[test]
fn the_top_level_holds_only_the_known_entries() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut present = BTreeSet::new();
    for entry in fs::read_dir(root).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        present.insert(name);
    }
    let unexpected: Vec<&String> = present
        .iter()
        .filter(|name| !TOP_LEVEL.contains(&name.as_str()))
        .filter(|name| !name.starts_with('.') && name.as_str() != "target")
        .collect();
    let missing: Vec<&str> = TOP_LEVEL
        .into_iter()
        .filter(|name| !present.contains(*name))
        .collect();
    assert!(
        unexpected.is_empty() && missing.is_empty(),
        "the top level should hold exactly {TOP_LEVEL:?}; unexpected: {unexpected:?}, \
         missing: {missing:?}"
    );
}

// ---- Reading the files --------------------------------------------------------------------

/// Collects `(module, file as shown to the reader, source)` for every library file under
/// `root/dir`, in a stable order.
fn read_library_files(root: &Path, dir: &Path, files: &mut Vec<(ModPath, String, String)>) {
    let mut entries: Vec<_> = fs::read_dir(root.join(dir))
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();
    entries.sort();
    for name in entries {
        let relative = dir.join(name);
        if root.join(&relative).is_dir() {
            read_library_files(root, &relative, files);
        } else if let Some(module) = module_of(&relative.to_string_lossy()) {
            let source = fs::read_to_string(root.join(&relative)).unwrap();
            files.push((module, relative.to_string_lossy().into_owned(), source));
        }
    }
}

/// The module a file under `src/` holds, or `None` for a file that is not a module of the
/// library (`src/main.rs`, `src/bin/**`, anything not `.rs`).
fn module_of(file: &str) -> Option<ModPath> {
    let path = file.strip_prefix("src/")?.strip_suffix(".rs")?;
    let mut segments: Vec<String> = path.split('/').map(String::from).collect();
    if path == "main" || segments[0] == "bin" {
        return None;
    }
    if path == "lib" || segments.last().is_some_and(|last| last == "mod") {
        segments.pop();
    }
    Some(segments)
}

/// The source with every comment and string literal replaced by spaces (line breaks kept, so
/// line numbers stay true): what is left is code, where `crate::` means a dependency.
fn blank_comments_and_strings(source: &str) -> String {
    let chars: Vec<char> = source.chars().collect();
    let mut code = String::with_capacity(source.len());
    let mut i = 0;
    while i < chars.len() {
        let end = match (chars[i], chars.get(i + 1).copied()) {
            ('/', Some('/')) => end_of_line_comment(&chars, i),
            ('/', Some('*')) => end_of_block_comment(&chars, i),
            ('"', _) => end_of_string(&chars, i),
            ('r', Some('"' | '#')) => end_of_raw_string(&chars, i),
            ('\'', _) => end_of_char(&chars, i),
            _ => None,
        };
        match end {
            Some(end) => {
                for &c in &chars[i..end] {
                    code.push(if c == '\n' { '\n' } else { ' ' });
                }
                i = end;
            }
            None => {
                code.push(chars[i]);
                i += 1;
            }
        }
    }
    code
}

fn end_of_line_comment(chars: &[char], start: usize) -> Option<usize> {
    let length = chars[start..].iter().position(|&c| c == '\n');
    Some(length.map_or(chars.len(), |length| start + length))
}

/// Block comments nest in Rust: `/* a /* b */ c */` is one comment.
fn end_of_block_comment(chars: &[char], start: usize) -> Option<usize> {
    let mut depth = 0;
    let mut i = start;
    while i + 1 < chars.len() {
        match (chars[i], chars[i + 1]) {
            ('/', '*') => {
                depth += 1;
                i += 2;
            }
            ('*', '/') => {
                depth -= 1;
                i += 2;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => i += 1,
        }
    }
    Some(chars.len())
}

fn end_of_string(chars: &[char], start: usize) -> Option<usize> {
    let mut i = start + 1;
    while i < chars.len() {
        match chars[i] {
            '\\' => i += 2,
            '"' => return Some(i + 1),
            _ => i += 1,
        }
    }
    Some(chars.len())
}

/// `r"…"`, `r#"…"#`: no escapes, ends at a quote followed by as many `#` as it opened with.
/// `r#name` (a raw identifier) is not a string.
fn end_of_raw_string(chars: &[char], start: usize) -> Option<usize> {
    let hashes = chars[start + 1..].iter().take_while(|&&c| c == '#').count();
    let mut i = start + 1 + hashes;
    if chars.get(i) != Some(&'"') {
        return None;
    }
    i += 1;
    while i < chars.len() {
        let closes = chars[i] == '"'
            && chars.len() >= i + 1 + hashes
            && chars[i + 1..i + 1 + hashes].iter().all(|&c| c == '#');
        if closes {
            return Some(i + 1 + hashes);
        }
        i += 1;
    }
    Some(chars.len())
}

/// `'x'`, `'\n'`, `'\u{1F600}'` are characters; `'a` in `&'a str` is a lifetime, left as code.
fn end_of_char(chars: &[char], start: usize) -> Option<usize> {
    if chars.get(start + 1) == Some(&'\\') {
        let length = chars.get(start + 3..)?.iter().position(|&c| c == '\'')?;
        return Some(start + 3 + length + 1);
    }
    (chars.get(start + 2) == Some(&'\'')).then_some(start + 3)
}

// ---- Finding the paths --------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq)]
enum Token {
    /// A name, keyword or number.
    Word(String),
    /// `::`
    PathSep,
    Open,
    Close,
    Comma,
    Star,
    /// Any other punctuation.
    Other(char),
}

/// Splits code (comments and strings already blanked) into tokens, each with its 1-based line.
fn tokens(code: &str) -> Vec<(Token, usize)> {
    let chars: Vec<char> = code.chars().collect();
    let mut tokens = Vec::new();
    let mut line = 1;
    let mut i = 0;
    let is_word = |c: char| c.is_alphanumeric() || c == '_';
    while i < chars.len() {
        let c = chars[i];
        if c == '\n' {
            line += 1;
        } else if is_word(c) {
            let length = chars[i..].iter().take_while(|&&c| is_word(c)).count();
            let word = chars[i..i + length].iter().collect();
            tokens.push((Token::Word(word), line));
            i += length;
            continue;
        } else if c == ':' && chars.get(i + 1) == Some(&':') {
            tokens.push((Token::PathSep, line));
            i += 2;
            continue;
        } else if !c.is_whitespace() {
            let token = match c {
                '{' => Token::Open,
                '}' => Token::Close,
                ',' => Token::Comma,
                '*' => Token::Star,
                other => Token::Other(other),
            };
            tokens.push((token, line));
        }
        i += 1;
    }
    tokens
}

/// Reads the path that starts at `tokens[start]` (a word), with its groups, and adds each
/// complete path to `found` as `(segments, line of its last segment)`:
/// `crate::{a::X, b::{self, Y}}` gives `crate::a::X`, `crate::b::self`, `crate::b::Y`.
/// Returns the index of the first token after the path.
fn read_path(
    tokens: &[(Token, usize)],
    start: usize,
    prefix: &[String],
    found: &mut Vec<(Vec<String>, usize)>,
) -> usize {
    let mut segments = prefix.to_vec();
    let mut line = tokens[start].1;
    let mut i = start;
    loop {
        match tokens.get(i).map(|(token, _)| token) {
            Some(Token::Word(name)) => {
                segments.push(name.clone());
                line = tokens[i].1;
                i += 1;
                match tokens.get(i).map(|(token, _)| token) {
                    Some(Token::PathSep) => i += 1,
                    // `use crate::a::X as Y`: the alias names nothing.
                    Some(Token::Word(word)) if word == "as" => {
                        i += 2;
                        break;
                    }
                    _ => break,
                }
            }
            Some(Token::Open) => {
                // A group: each member continues the path read so far.
                i += 1;
                loop {
                    match tokens.get(i).map(|(token, _)| token) {
                        None => return i,
                        Some(Token::Close) => return i + 1,
                        Some(Token::Comma) => i += 1,
                        Some(_) => i = read_path(tokens, i, &segments, found).max(i + 1),
                    }
                }
            }
            // A glob (`use super::*`) depends on the module it reads from.
            Some(Token::Star) => {
                i += 1;
                break;
            }
            // `crate::a::` followed by `<` or anything else: the path ends here.
            _ => break,
        }
    }
    found.push((segments, line));
    i
}

/// If `tokens[i..]` opens a test-only inline module (`#[cfg(test)] mod tests {`, `pub`
/// allowed), the index just after its closing brace.
fn skip_test_module(tokens: &[(Token, usize)], i: usize) -> Option<usize> {
    let attribute = ["#", "[", "cfg", "(", "test", ")", "]"];
    let mut next = i;
    for expected in attribute {
        let matches = match tokens.get(next).map(|(token, _)| token) {
            Some(Token::Word(word)) => word == expected,
            Some(Token::Other(c)) => c.to_string() == expected,
            _ => false,
        };
        if !matches {
            return None;
        }
        next += 1;
    }
    if tokens.get(next).map(|(token, _)| token) == Some(&Token::Word("pub".into())) {
        next += 1;
    }
    let mod_keyword = tokens.get(next).map(|(token, _)| token);
    let brace = tokens.get(next + 2).map(|(token, _)| token);
    if mod_keyword != Some(&Token::Word("mod".into())) || brace != Some(&Token::Open) {
        return None;
    }
    let mut depth = 0;
    for (index, (token, _)) in tokens.iter().enumerate().skip(next + 2) {
        match token {
            Token::Open => depth += 1,
            Token::Close if depth == 1 => return Some(index + 1),
            Token::Close => depth -= 1,
            _ => {}
        }
    }
    Some(tokens.len())
}

/// The modules `source` (the file holding `module`) depends on, each with the line of the
/// reference, in source order. `modules` is every module of the crate.
fn dependencies(
    module: &ModPath,
    source: &str,
    modules: &BTreeSet<ModPath>,
) -> Vec<(ModPath, usize)> {
    let tokens = tokens(&blank_comments_and_strings(source));
    let mut dependencies = Vec::new();
    // Inline `mod name {` blocks we are inside, with the brace depth each one closes at.
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0;
    let mut i = 0;
    while i < tokens.len() {
        if let Some(after) = skip_test_module(&tokens, i) {
            i = after;
            continue;
        }
        let word = |at: usize| match tokens.get(at) {
            Some((Token::Word(word), _)) => Some(word.as_str()),
            _ => None,
        };
        let token_is = |at: usize, wanted: Token| tokens.get(at).map(|(t, _)| t) == Some(&wanted);
        let mut current = module.clone();
        current.extend(inline.iter().map(|(name, _)| name.clone()));

        if word(i) == Some("mod") && word(i + 1).is_some() && token_is(i + 2, Token::Open) {
            depth += 1;
            inline.push((word(i + 1).unwrap_or_default().to_string(), depth));
            i += 3;
        } else if token_is(i, Token::Open) {
            depth += 1;
            i += 1;
        } else if token_is(i, Token::Close) {
            if inline.last().is_some_and(|(_, at)| *at == depth) {
                inline.pop();
            }
            depth = depth.saturating_sub(1);
            i += 1;
        } else if let Some(first) = word(i)
            && token_is(i + 1, Token::PathSep)
            && (i == 0 || !token_is(i - 1, Token::PathSep))
        {
            // The start of a path: read all of it, keep it if it names this crate.
            let mut found = Vec::new();
            i = read_path(&tokens, i, &[], &mut found);
            let mut child = current.clone();
            child.push(first.to_string());
            let ours = matches!(first, "crate" | "super" | "self") || modules.contains(&child);
            if ours {
                for (segments, line) in found {
                    let target = longest_module(&resolve(&current, &segments), modules);
                    if target != *module {
                        dependencies.push((target, line));
                    }
                }
            }
        } else {
            i += 1;
        }
    }
    dependencies
}

/// The absolute path (from the crate root) that `segments`, written inside `current`, names.
fn resolve(current: &[String], segments: &[String]) -> Vec<String> {
    let (mut path, rest) = match segments.first().map(String::as_str) {
        Some("crate") => (Vec::new(), &segments[1..]),
        _ => (current.to_vec(), segments),
    };
    for segment in rest {
        match segment.as_str() {
            "self" => {}
            "super" => {
                path.pop();
            }
            name => path.push(name.to_string()),
        }
    }
    path
}

/// The longest prefix of `path` that is a module: `db::Db` → `db`.
fn longest_module(path: &[String], modules: &BTreeSet<ModPath>) -> ModPath {
    (0..=path.len())
        .rev()
        .map(|length| path[..length].to_vec())
        .find(|prefix| modules.contains(prefix))
        .unwrap_or_default()
}

/// The graph of `(module, file, source)` triples; each dependency keeps its first reference.
fn module_graph(files: &[(ModPath, String, String)]) -> Graph {
    let modules: BTreeSet<ModPath> = files.iter().map(|(module, _, _)| module.clone()).collect();
    let mut graph = Graph::new();
    for (module, file, source) in files {
        let edges = graph.entry(module.clone()).or_default();
        for (target, line) in dependencies(module, source, &modules) {
            edges
                .entry(target)
                .or_insert_with(|| format!("{file}:{line}"));
        }
    }
    graph
}

// ---- Finding the loops --------------------------------------------------------------------

fn name(module: &ModPath) -> String {
    if module.is_empty() {
        "crate".to_string()
    } else {
        module.join("::")
    }
}

/// Every module reachable from `from` by following one or more dependencies.
fn reachable(graph: &Graph, from: &ModPath) -> BTreeSet<ModPath> {
    let mut seen = BTreeSet::new();
    let mut to_visit: Vec<&ModPath> = graph[from].keys().collect();
    while let Some(module) = to_visit.pop() {
        if seen.insert(module.clone()) {
            to_visit.extend(graph.get(module).into_iter().flat_map(|deps| deps.keys()));
        }
    }
    seen
}

/// The groups of modules that reach each other (strongly connected components of more than
/// one module). Small graphs: computing what each module reaches is fast and easy to follow.
fn tangled_groups(graph: &Graph) -> Vec<BTreeSet<ModPath>> {
    let reach: BTreeMap<&ModPath, BTreeSet<ModPath>> = graph
        .keys()
        .map(|module| (module, reachable(graph, module)))
        .collect();
    let mut groups: Vec<BTreeSet<ModPath>> = Vec::new();
    for (module, reached) in &reach {
        if groups.iter().any(|group| group.contains(*module)) {
            continue;
        }
        let group: BTreeSet<ModPath> = reached
            .iter()
            .filter(|other| reach.get(other).is_some_and(|back| back.contains(*module)))
            .cloned()
            .collect();
        if group.len() > 1 {
            groups.push(group);
        }
    }
    groups
}

/// The shortest chain of dependencies from `from` to `to` staying inside `group`.
fn shortest_path(
    graph: &Graph,
    group: &BTreeSet<ModPath>,
    from: &ModPath,
    to: &ModPath,
) -> Vec<ModPath> {
    let mut came_from: BTreeMap<ModPath, ModPath> = BTreeMap::new();
    let mut queue = VecDeque::from([from.clone()]);
    while let Some(module) = queue.pop_front() {
        if module == *to {
            let mut path = vec![module];
            while let Some(previous) = came_from.get(&path[path.len() - 1]) {
                path.push(previous.clone());
            }
            path.reverse();
            return path;
        }
        for next in graph[&module].keys().filter(|next| group.contains(*next)) {
            if *next != *from && !came_from.contains_key(next) {
                came_from.insert(next.clone(), module.clone());
                queue.push_back(next.clone());
            }
        }
    }
    Vec::new()
}

/// Loops covering every dependency inside `group`, each as the modules in order with the
/// first one repeated at the end: `[app, server, app]`.
fn loops(graph: &Graph, group: &BTreeSet<ModPath>) -> Vec<Vec<ModPath>> {
    let mut loops: Vec<Vec<ModPath>> = Vec::new();
    let mut covered: BTreeSet<(ModPath, ModPath)> = BTreeSet::new();
    for from in group {
        for to in graph[from].keys().filter(|to| group.contains(*to)) {
            if covered.contains(&(from.clone(), to.clone())) {
                continue;
            }
            let mut cycle = vec![from.clone()];
            cycle.extend(shortest_path(graph, group, to, from));
            for pair in cycle.windows(2) {
                covered.insert((pair[0].clone(), pair[1].clone()));
            }
            loops.push(cycle);
        }
    }
    loops
}

/// The failure message: each group of modules that reach each other, its loops, and for
/// each dependency on a loop the line that creates it. Empty when there is no loop.
fn describe_loops(graph: &Graph) -> String {
    let groups = tangled_groups(graph);
    if groups.is_empty() {
        return String::new();
    }
    let mut report = format!(
        "src/ has {} group(s) of modules that import each other, directly or around a loop. \
         Break each loop at one of its lines, by moving what both sides need below both.\n",
        groups.len()
    );
    for group in &groups {
        let loops = loops(graph, group);
        let members: Vec<String> = group.iter().map(name).collect();
        report += &format!(
            "\n{} reach each other ({} loops):\n",
            members.join(", "),
            loops.len()
        );
        for cycle in &loops {
            let names: Vec<String> = cycle.iter().map(name).collect();
            report += &format!("\n  {}\n", names.join(" → "));
            for pair in cycle.windows(2) {
                let edge = format!("{} → {}", name(&pair[0]), name(&pair[1]));
                report += &format!("    {edge:<40} {}\n", graph[&pair[0]][&pair[1]]);
            }
        }
    }
    report
}

// ---- The parser and the loop finder, on small examples -------------------------------------

/// Parses `source` as the file of `module` in a crate made of `modules` (`""` is the root),
/// and returns its dependencies as `name:line`.
fn deps_of(module: &str, source: &str, modules: &[&str]) -> Vec<String> {
    let to_path = |name: &str| -> ModPath {
        name.split("::")
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect()
    };
    let modules: BTreeSet<ModPath> = modules.iter().map(|m| to_path(m)).collect();
    dependencies(&to_path(module), source, &modules)
        .iter()
        .map(|(target, line)| format!("{}:{line}", name(target)))
        .collect()
}

/// A crate made of `(module, source)` files, its loops described.
fn loops_in(files: &[(&str, &str)]) -> String {
    let files: Vec<(ModPath, String, String)> = files
        .iter()
        .map(|(module, source)| {
            let path: ModPath = module
                .split("::")
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect();
            (path, format!("{module}.rs"), source.to_string())
        })
        .collect();
    describe_loops(&module_graph(&files))
}

#[test]
fn files_map_to_modules_and_the_binaries_are_skipped() {
    let module = |file| module_of(file).map(|m| name(&m));
    assert_eq!(module("src/lib.rs").as_deref(), Some("crate"));
    assert_eq!(module("src/a.rs").as_deref(), Some("a"));
    assert_eq!(module("src/a/mod.rs").as_deref(), Some("a"));
    assert_eq!(module("src/a/b.rs").as_deref(), Some("a::b"));
    assert_eq!(module("src/main.rs"), None);
    assert_eq!(module("src/bin/tool.rs"), None);
    assert_eq!(module("src/a/notes.md"), None);
}

#[test]
fn a_grouped_use_over_several_lines_gives_one_dependency_per_member() {
    let source = "use std::{io, fmt};\n\
                  use crate::{\n\
                      db::Db,\n\
                      edge::{self, http::{Reply, problem}},\n\
                      ids::request_id as new_id,\n\
                  };\n";
    let modules = ["", "db", "edge", "edge::http", "ids", "app"];
    assert_eq!(
        deps_of("app", source, &modules),
        ["db:3", "edge:4", "edge::http:4", "edge::http:4", "ids:5"]
    );
}

#[test]
fn super_in_a_nested_module_resolves_from_that_module() {
    let source = "use super::config::Config;\n\
                  mod inner {\n\
                      use super::Local;\n\
                      use super::super::db::Db;\n\
                      use self::deeper::Thing;\n\
                  }\n\
                  use super::ids;\n";
    let modules = ["", "edge", "edge::http", "edge::config", "db", "edge::ids"];
    // Inside `edge::http::inner`, `super` is `edge::http` itself (no dependency) and
    // `super::super` is `edge`; after the inline module closes, `super` is `edge` again.
    assert_eq!(
        deps_of("edge::http", source, &modules),
        ["edge::config:1", "edge:4", "edge::ids:7"]
    );
}

#[test]
fn an_inline_crate_path_is_a_dependency_and_a_comment_or_string_is_not() {
    let source = "fn handle() {\n\
                  let id = crate::ids::request_id();\n\
                  let db = <crate::db::Db as Default>::default();\n\
                  // crate::app::App would be a loop, but this is a comment\n\
                  log::info!(target: \"crate::app\", \"{}\", '\"');\n\
                  /* crate::app /* nested */ crate::app */ let s = r#\"crate::app\"#;\n\
                  }\n\
                  /// See [`crate::app::App`].\n\
                  pub(crate) fn f<'a>(x: &'a str) -> &'a str { crate::ids::trim(x) }\n";
    let modules = ["", "ids", "db", "app", "payments"];
    assert_eq!(
        deps_of("payments", source, &modules),
        ["ids:2", "db:3", "ids:9"]
    );
}

#[test]
fn a_test_module_may_import_anything() {
    let source = "use crate::db::Db;\n\
                  #[cfg(test)]\n\
                  mod tests {\n\
                      use super::*;\n\
                      use crate::app::App;\n\
                      fn f() { if true { crate::app::run(); } }\n\
                  }\n\
                  fn after() { crate::ids::request_id(); }\n";
    let modules = ["", "db", "app", "ids", "payments"];
    assert_eq!(deps_of("payments", source, &modules), ["db:1", "ids:8"]);
}

#[test]
fn declaring_a_child_is_not_a_dependency_but_importing_from_it_is() {
    let parent = "pub mod client;\npub mod sim;\npub use client::Client;\n";
    let modules = ["", "provider", "provider::client", "provider::sim"];
    assert_eq!(
        deps_of("provider", parent, &modules),
        ["provider::client:3"]
    );
    let child = "use super::Shared;\nuse crate::provider::sim::Wire;\n";
    assert_eq!(
        deps_of("provider::client", child, &modules),
        ["provider:1", "provider::sim:2"]
    );
}

#[test]
fn a_loop_through_three_modules_is_reported_with_the_line_of_each_link() {
    let report = loops_in(&[
        ("", "pub mod a;\npub mod b;\npub mod c;\npub mod d;\n"),
        ("a", "use crate::b::B;\n"),
        ("b", "\nuse crate::c::{C, D};\n"),
        ("c", "fn f() {}\n\nfn g() { crate::a::run(); }\n"),
        ("d", "use crate::a::A;\n"),
    ]);
    assert!(report.contains("a → b → c → a"), "{report}");
    assert!(report.contains("a.rs:1"), "{report}");
    assert!(report.contains("b.rs:2"), "{report}");
    assert!(report.contains("c.rs:3"), "{report}");
    // `d` imports `a` but nothing imports `d` back: not part of the loop.
    assert!(!report.contains("d →"), "{report}");
    assert!(report.starts_with("src/ has 1 group(s)"), "{report}");
    assert!(
        report.contains("a, b, c reach each other (1 loops)"),
        "{report}"
    );
}

#[test]
fn two_loops_sharing_a_module_are_both_reported() {
    let report = loops_in(&[
        (
            "app",
            "use crate::server::Server;\nuse crate::shutdown::Stop;\n",
        ),
        ("server", "use crate::app::App;\n"),
        ("shutdown", "use crate::app::App;\n"),
    ]);
    assert!(report.contains("app → server → app"), "{report}");
    assert!(report.contains("app → shutdown → app"), "{report}");
    assert!(report.starts_with("src/ has 1 group(s)"), "{report}");
    assert!(
        report.contains("app, server, shutdown reach each other (2 loops)"),
        "{report}"
    );
}

#[test]
fn a_graph_without_loops_passes() {
    let report = loops_in(&[
        (
            "",
            "pub mod app;\npub mod server;\npub mod db;\npub mod provider;\n",
        ),
        (
            "app",
            "use crate::server;\nuse crate::db::Db;\nuse crate::provider::client::C;\n",
        ),
        (
            "server",
            "use crate::db::Db;\nuse crate::provider::{self, client};\n",
        ),
        (
            "db",
            "use std::sync::Arc;\n#[cfg(test)]\nmod tests { use crate::app::App; }\n",
        ),
        ("provider", "pub mod client;\n"),
        ("provider::client", "use super::super::db::Db;\n"),
    ]);
    assert_eq!(report, "");
}
