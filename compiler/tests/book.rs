//! Every command the book and README.md show is run, and its output compared
//! with what the page shows: a change that alters a shown output fails here
//! until the page is updated.
//!
//! A *session* is a fenced ```` ```text ```` block whose first line starts with
//! `$ `: each `$ COMMAND` line is followed by the output the reader is
//! promised (standard output and standard error as a terminal interleaves
//! them). The sessions of one page run in order, in one `bash`, in a fresh
//! directory that holds links to the repository's folders (`examples/`,
//! `compiler/`, `tests/`, ...), with this build's `moec` first on `PATH`; so a
//! page can write a file in one command and use it in the next, and `echo $?`
//! prints the previous command's exit status.
//!
//! In an expected output, `[..]` matches any text within a line and a line
//! `...` matches any number of lines: use them for what changes from run to
//! run (timings) or for the parts a page leaves out on purpose.
//!
//! Directives, as HTML comments that mdBook does not render:
//! - `<!-- doctest: file NAME -->` before a fenced block: the block's text is
//!   written to `NAME` before the page's sessions run.
//! - `<!-- doctest: file NAME` ... `-->`: the comment's remaining lines are
//!   the file (for a file the page shows only in part).
//! - `<!-- doctest: run COMMAND -->`: a shell command run (its output
//!   unchecked) before the next session, for what the page asks the reader
//!   to do by hand (edit a file).
//! - `<!-- doctest: requires nvrtc -->` (or `numpy`) before a session: it
//!   runs only where NVRTC is found (`MOEC_CUDA_HOME`, as in CI) or Python
//!   imports numpy (CI installs it), and is reported skipped elsewhere.
//! - `<!-- doctest: skip REASON -->` before a session: not run (a GPU's
//!   figures, measured on a date the page names).
//!
//! `MOEC_BLESS=1 cargo test -p moec --test book` rewrites every expected
//! output that differs with what the command printed (check the diff: an
//! elided block comes back in full).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// One `$ COMMAND` and the lines the page shows after it.
struct Shown {
    command: String,
    /// Line numbers (0-based, in the page) of the expected output.
    lines: std::ops::Range<usize>,
    expected: Vec<String>,
}

struct Session {
    /// Line of the opening fence (1-based, for messages).
    line: usize,
    commands: Vec<Shown>,
    requires: Option<Requirement>,
    skip: Option<String>,
    /// Hidden commands run before the session (`doctest: run`).
    setup: Vec<String>,
}

struct Page {
    text: Vec<String>,
    files: BTreeMap<String, String>,
    sessions: Vec<Session>,
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn pages() -> Vec<PathBuf> {
    let mut out = vec![root().join("README.md")];
    let mut stack = vec![root().join("book/src")];
    while let Some(dir) = stack.pop() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "md") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn parse(path: &Path) -> Page {
    let source =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let text: Vec<String> = source.lines().map(str::to_string).collect();
    let mut page = Page {
        text: text.clone(),
        files: BTreeMap::new(),
        sessions: Vec::new(),
    };
    let (mut next_file, mut requires, mut skip) =
        (None::<String>, None::<Requirement>, None::<String>);
    let mut setup: Vec<String> = Vec::new();
    let mut i = 0;
    while i < text.len() {
        let line = text[i].trim_end();
        if let Some(rest) = line.trim_start().strip_prefix("<!-- doctest:") {
            let rest = rest.trim();
            if let Some(body) = rest.strip_prefix("file ") {
                match body.strip_suffix("-->") {
                    Some(name) => next_file = Some(name.trim().to_string()),
                    None => {
                        // The file's text follows, up to the closing `-->`.
                        let name = body.trim().to_string();
                        let mut content = String::new();
                        i += 1;
                        while i < text.len() && text[i].trim_end() != "-->" {
                            content.push_str(&text[i]);
                            content.push('\n');
                            i += 1;
                        }
                        page.files.insert(name, content);
                    }
                }
            } else if let Some(cmd) = rest.strip_prefix("run ") {
                setup.push(cmd.trim_end_matches("-->").trim().to_string());
            } else if rest.starts_with("requires nvrtc") {
                requires = Some(Requirement::Nvrtc);
            } else if rest.starts_with("requires numpy") {
                requires = Some(Requirement::Numpy);
            } else if let Some(reason) = rest.strip_prefix("skip") {
                skip = Some(reason.trim_end_matches("-->").trim().to_string());
            } else {
                panic!(
                    "{}:{}: unknown doctest directive `{rest}`",
                    path.display(),
                    i + 1
                );
            }
            i += 1;
            continue;
        }
        let fence = line.trim_start();
        if let Some(info) = fence.strip_prefix("```") {
            let indent = line.len() - fence.len();
            let start = i;
            let mut end = i + 1;
            while end < text.len() && text[end].trim() != "```" {
                end += 1;
            }
            let body: Vec<String> = text[start + 1..end.min(text.len())]
                .iter()
                .map(|l| l.get(indent..).unwrap_or(l.trim_start()).to_string())
                .collect();
            if let Some(name) = next_file.take() {
                page.files
                    .insert(name, body.iter().map(|l| format!("{l}\n")).collect());
            } else if info.trim() == "text" && body.first().is_some_and(|l| l.starts_with("$ ")) {
                let mut commands: Vec<Shown> = Vec::new();
                for (k, l) in body.iter().enumerate() {
                    let at = start + 1 + k;
                    if let Some(cmd) = l.strip_prefix("$ ") {
                        commands.push(Shown {
                            command: cmd.to_string(),
                            lines: at + 1..at + 1,
                            expected: Vec::new(),
                        });
                    } else if let Some(last) = commands.last_mut() {
                        last.expected.push(l.clone());
                        last.lines.end = at + 1;
                    }
                }
                page.sessions.push(Session {
                    line: start + 1,
                    commands,
                    requires: requires.take(),
                    skip: skip.take(),
                    setup: std::mem::take(&mut setup),
                });
            }
            requires = None;
            skip = None;
            i = end + 1;
            continue;
        }
        i += 1;
    }
    page
}

/// What a blessed page shows for a command: the output in full, or, where
/// the page elided lines (`...`), as many of the output's first and last
/// lines as it showed before the first and after the last elision.
fn blessed(expected: &[String], actual: &[String]) -> Vec<String> {
    let first = expected.iter().position(|l| l.trim() == "...");
    let last = expected.iter().rposition(|l| l.trim() == "...");
    match (first, last) {
        (Some(first), Some(last)) => {
            let tail = expected.len() - last - 1;
            if first + tail >= actual.len() {
                return actual.to_vec();
            }
            let mut out = actual[..first].to_vec();
            out.push("...".into());
            out.extend_from_slice(&actual[actual.len() - tail..]);
            out
        }
        _ => actual.to_vec(),
    }
}

/// `expected` (with `[..]` and `...`) matches `actual`.
fn matches(expected: &[String], actual: &[String]) -> bool {
    match expected.split_first() {
        None => actual.is_empty(),
        Some((first, rest)) if first.trim() == "..." => {
            (0..=actual.len()).any(|skip| matches(rest, &actual[skip..]))
        }
        Some((first, rest)) => actual
            .split_first()
            .is_some_and(|(a, more)| line_matches(first, a) && matches(rest, more)),
    }
}

fn line_matches(expected: &str, actual: &str) -> bool {
    let (expected, actual) = (expected.trim_end(), actual.trim_end());
    let parts: Vec<&str> = expected.split("[..]").collect();
    if parts.len() == 1 {
        return expected == actual;
    }
    let Some(mut rest) = actual.strip_prefix(parts[0]) else {
        return false;
    };
    let last = parts.len() - 1;
    for (k, part) in parts.iter().enumerate().skip(1) {
        if k == last {
            return rest.ends_with(part);
        }
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    true
}

/// What a session needs beyond `moec` and a shell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Requirement {
    Nvrtc,
    Numpy,
}

impl Requirement {
    fn met(self) -> bool {
        match self {
            Requirement::Nvrtc => {
                std::env::var_os("MOEC_CUDA_HOME").is_some_and(|d| Path::new(&d).exists())
            }
            Requirement::Numpy => Command::new("python3")
                .args(["-c", "import numpy"])
                .output()
                .is_ok_and(|o| o.status.success()),
        }
    }

    fn what(self) -> &'static str {
        match self {
            Requirement::Nvrtc => "needs NVRTC (MOEC_CUDA_HOME)",
            Requirement::Numpy => "needs Python with numpy",
        }
    }
}

fn unmet(session: &Session) -> Option<Requirement> {
    session.requires.filter(|r| !r.met())
}

const MARK: &str = "\u{1e}doctest-command";

/// Runs a page's sessions in one bash in a fresh directory; returns, per
/// session and command, the output lines.
fn run(page: &Page, dir: &Path) -> Vec<Vec<Vec<String>>> {
    let repo = root().canonicalize().expect("the repository root");
    for entry in std::fs::read_dir(&repo).expect("the repository root") {
        let entry = entry.expect("a directory entry");
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') || name == "target" {
            continue;
        }
        std::os::unix::fs::symlink(entry.path(), dir.join(&name)).expect("a link");
    }
    for (name, content) in &page.files {
        std::fs::write(dir.join(name), content).expect("a page's file");
    }
    let mut script = String::from("set +e\n");
    for (s, session) in page.sessions.iter().enumerate() {
        if session.skip.is_some() || unmet(session).is_some() {
            continue;
        }
        for cmd in &session.setup {
            let _ = writeln!(script, "{{ {cmd}\n}} >/dev/null 2>&1");
        }
        for (c, shown) in session.commands.iter().enumerate() {
            let _ = writeln!(
                script,
                "__status=$?; printf '\\n{MARK} {s} {c}\\n'; (exit $__status)\n{{ {}\n}} 2>&1",
                shown.command
            );
        }
    }
    let moec = Path::new(env!("CARGO_BIN_EXE_moec"));
    let path = format!(
        "{}:{}",
        moec.parent().expect("the binary's folder").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(dir)
        .env("PATH", path)
        .env_remove("NO_COLOR")
        .output()
        .expect("bash runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut results: Vec<Vec<Vec<String>>> = page
        .sessions
        .iter()
        .map(|s| vec![Vec::new(); s.commands.len()])
        .collect();
    let mut current: Option<(usize, usize)> = None;
    for line in stdout.lines() {
        if let Some(rest) = line.strip_prefix(MARK) {
            let mut it = rest
                .split_whitespace()
                .map(|v| v.parse::<usize>().unwrap_or(0));
            current = Some((it.next().unwrap_or(0), it.next().unwrap_or(0)));
            // Drop the blank line the marker's leading newline left behind.
            continue;
        }
        if let Some((s, c)) = current {
            results[s][c].push(line.to_string());
        }
    }
    // Each marker starts with a newline: the line before it is an artefact.
    for session in results.iter_mut() {
        for output in session.iter_mut() {
            if output.last().is_some_and(|l| l.is_empty()) {
                output.pop();
            }
        }
    }
    results
}

#[test]
fn every_command_the_book_shows_prints_what_the_book_shows() {
    let bless = std::env::var_os("MOEC_BLESS").is_some();
    let mut failures = Vec::new();
    let (mut ran, mut skipped) = (0usize, Vec::new());
    for path in pages() {
        let page = parse(&path);
        if page.sessions.is_empty() {
            continue;
        }
        let tmp = std::env::temp_dir().join(format!(
            "moec-book-{}-{}",
            std::process::id(),
            path.file_stem().unwrap_or_default().to_string_lossy()
        ));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).expect("a temporary folder");
        let results = run(&page, &tmp);
        let _ = std::fs::remove_dir_all(&tmp);
        let mut text = page.text.clone();
        let mut edits: Vec<(std::ops::Range<usize>, Vec<String>)> = Vec::new();
        let shown = path
            .strip_prefix(root())
            .unwrap_or(&path)
            .display()
            .to_string();
        for (s, session) in page.sessions.iter().enumerate() {
            if let Some(reason) = &session.skip {
                skipped.push(format!("{shown}:{}: {reason}", session.line));
                continue;
            }
            if let Some(r) = unmet(session) {
                skipped.push(format!("{shown}:{}: {}", session.line, r.what()));
                continue;
            }
            for (c, cmd) in session.commands.iter().enumerate() {
                ran += 1;
                let actual = &results[s][c];
                if matches(&cmd.expected, actual) {
                    continue;
                }
                let first = (0..cmd.expected.len().max(actual.len()))
                    .find(|&k| {
                        cmd.expected.get(k).map(|l| l.trim_end())
                            != actual.get(k).map(|l| l.trim_end())
                    })
                    .unwrap_or(0);
                failures.push(format!(
                    "{shown}:{}: `$ {}` printed something else; first difference at output line {}:\n  page: {:?}\n  got:  {:?}",
                    cmd.lines.start,
                    cmd.command,
                    first + 1,
                    cmd.expected.get(first),
                    actual.get(first),
                ));
                edits.push((cmd.lines.clone(), blessed(&cmd.expected, actual)));
            }
        }
        if bless && !edits.is_empty() {
            edits.sort_by_key(|(r, _)| std::cmp::Reverse(r.start));
            for (range, lines) in edits {
                text.splice(range, lines);
            }
            let mut out = text.join("\n");
            out.push('\n');
            std::fs::write(&path, out).expect("the page is writable");
        }
    }
    for s in &skipped {
        eprintln!("skipped: {s}");
    }
    eprintln!("{ran} commands run, {} sessions skipped", skipped.len());
    assert!(ran >= 30, "only {ran} commands were found");
    assert!(
        failures.is_empty() || bless,
        "{} shown output(s) differ (MOEC_BLESS=1 rewrites them):\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

#[test]
fn the_matcher_understands_the_wildcards() {
    let v = |s: &[&str]| s.iter().map(|l| l.to_string()).collect::<Vec<_>>();
    assert!(matches(&v(&["a [..] c"]), &v(&["a b b c"])));
    assert!(!matches(&v(&["a [..] c"]), &v(&["a b b d"])));
    assert!(matches(&v(&["x", "...", "z"]), &v(&["x", "1", "2", "z"])));
    assert!(matches(&v(&["x", "...", "z"]), &v(&["x", "z"])));
    assert!(!matches(&v(&["x", "...", "z"]), &v(&["x", "y"])));
    assert!(matches(&v(&["wall [..] ms"]), &v(&["wall 5.4 ms"])));
}

/// The id mdBook gives a heading: alphanumerics, `_` and `-` kept (lower
/// case), whitespace turned into `-`, everything else dropped.
fn heading_id(heading: &str) -> String {
    heading
        .chars()
        .filter_map(|ch| {
            if ch.is_alphanumeric() || ch == '_' || ch == '-' {
                Some(ch.to_ascii_lowercase())
            } else if ch.is_whitespace() {
                Some('-')
            } else {
                None
            }
        })
        .collect()
}

/// The heading ids of a Markdown file (outside fenced blocks).
fn heading_ids(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut ids = Vec::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        } else if !fenced && line.starts_with('#') {
            ids.push(heading_id(line.trim_start_matches('#').trim()));
        }
    }
    ids
}

/// The `](target)` links of a Markdown file outside fenced blocks and code
/// spans, with their line numbers.
fn links(path: &Path) -> Vec<(usize, String)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut out = Vec::new();
    let mut fenced = false;
    for (n, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        // Drop code spans, whose text is not a link.
        let mut plain = String::new();
        let mut in_code = false;
        for ch in line.chars() {
            if ch == '`' {
                in_code = !in_code;
            } else if !in_code {
                plain.push(ch);
            }
        }
        let mut rest = plain.as_str();
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let Some(end) = after.find(')') else { break };
            out.push((n + 1, after[..end].to_string()));
            rest = &after[end..];
        }
    }
    out
}

/// Every relative link of the book and README.md names a file that exists
/// and, with `#anchor`, a heading of that file.
#[test]
fn every_link_of_the_book_resolves() {
    let mut broken = Vec::new();
    for page in pages() {
        let shown = page
            .strip_prefix(root())
            .unwrap_or(&page)
            .display()
            .to_string();
        for (line, target) in links(&page) {
            if target.contains("://") || target.starts_with("mailto:") || target.is_empty() {
                continue;
            }
            let (file, anchor) = match target.split_once('#') {
                Some((f, a)) => (f, Some(a)),
                None => (target.as_str(), None),
            };
            let path = if file.is_empty() {
                page.clone()
            } else {
                page.parent().unwrap_or(Path::new(".")).join(file)
            };
            if !path.exists() {
                broken.push(format!("{shown}:{line}: `{target}`: no such file"));
                continue;
            }
            if let Some(anchor) = anchor {
                let md = if path.extension().is_some_and(|x| x == "html") {
                    path.with_extension("md")
                } else {
                    path.clone()
                };
                if md.extension().is_some_and(|x| x == "md")
                    && !heading_ids(&md).iter().any(|id| id == anchor)
                {
                    broken.push(format!(
                        "{shown}:{line}: `{target}`: no heading `#{anchor}`"
                    ));
                }
            }
        }
    }
    assert!(
        broken.is_empty(),
        "{} broken link(s):\n{}",
        broken.len(),
        broken.join("\n")
    );
}
