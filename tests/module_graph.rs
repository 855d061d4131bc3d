//! The library's modules form a layered graph: each uses only modules below
//! it (ARCHITECTURE.md, *Module graph*). This test reads `src/` and fails on
//! any cycle, naming it, so a backward import cannot creep in unnoticed.
//!
//! A module is a file (`src/engine.rs` is `engine`, `src/model/v7.rs` is
//! `model::v7`, `src/gpu/mod.rs` is `gpu`); it uses every module it names
//! through `crate::…` or `super::…` paths, and a parent uses a child it names
//! as `child::…`. A parent declaring or re-exporting its children (`mod v7;`,
//! `pub use v7::X;`) is not a use: the parent is then only a facade.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// `src/model/v7.rs` -> `model::v7`; `src/gpu/mod.rs` -> `gpu`.
fn module_of(rel: &Path) -> String {
    let s = rel.with_extension("").to_string_lossy().replace('\\', "/");
    s.trim_end_matches("/mod").replace('/', "::")
}

fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Code without `//` comments (doc comments name modules freely).
fn code(text: &str) -> String {
    text.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n")
}

/// Module paths named after `prefix` (`crate::` or `super::`), as the
/// identifier segments that follow it, including `{a, b}` groups.
fn named_after(text: &str, prefix: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find(prefix) {
        let before = rest[..at].chars().last();
        rest = &rest[at + prefix.len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let mut path = Vec::new();
        // `prefix{a, b}` is a group right after the prefix.
        let mut s = rest;
        if let Some(group) = s.strip_prefix('{') {
            let close = group.find('}').unwrap_or(group.len());
            for member in group[..close].split(',') {
                let name: String = member.trim().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                out.push(vec![name]);
            }
            continue;
        }
        loop {
            let end = s.find(|c: char| !(c.is_alphanumeric() || c == '_')).unwrap_or(s.len());
            if end > 0 {
                path.push(s[..end].to_string());
            }
            s = &s[end..];
            if let Some(next) = s.strip_prefix("::") {
                if let Some(group) = next.strip_prefix('{') {
                    // One path per member of the group.
                    let close = group.find('}').unwrap_or(group.len());
                    for member in group[..close].split(',') {
                        let name: String =
                            member.trim().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                        let mut p = path.clone();
                        p.push(name);
                        out.push(p);
                    }
                    path.clear();
                    break;
                }
                s = next;
            } else {
                break;
            }
        }
        if !path.is_empty() {
            out.push(path);
        }
    }
    out
}

/// The longest known module that `path` starts with.
fn resolve(path: &[String], known: &BTreeSet<String>) -> Option<String> {
    (1..=path.len()).rev().map(|n| path[..n].join("::")).find(|m| known.contains(m))
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut all = Vec::new();
    files(&src, &mut all);
    let modules: Vec<(String, std::path::PathBuf)> = all
        .into_iter()
        .filter_map(|p| {
            let rel = p.strip_prefix(&src).unwrap().to_path_buf();
            // The crate root and the binary are not modules of the graph.
            (rel != Path::new("lib.rs") && rel != Path::new("main.rs")).then(|| (module_of(&rel), p))
        })
        .collect();
    let known: BTreeSet<String> = modules.iter().map(|(m, _)| m.clone()).collect();
    let mut g = BTreeMap::new();
    for (m, path) in &modules {
        let text = code(&std::fs::read_to_string(path).unwrap());
        let parent: Vec<String> = m.split("::").map(String::from).collect::<Vec<_>>();
        let parent = &parent[..parent.len() - 1];
        let mut uses = BTreeSet::new();
        for p in named_after(&text, "crate::") {
            uses.extend(resolve(&p, &known));
        }
        for p in named_after(&text, "super::") {
            let mut full = parent.to_vec();
            full.extend(p);
            // `super::X` where X is an item of the parent resolves to the parent.
            uses.extend(resolve(&full, &known).or_else(|| (!parent.is_empty()).then(|| parent.join("::"))));
        }
        // Children named by relative paths, outside declarations and re-exports.
        let body: String = text
            .lines()
            .filter(|l| {
                let l = l.trim_start();
                !(l.starts_with("pub use") || l.starts_with("pub mod") || l.starts_with("mod "))
            })
            .collect::<Vec<_>>()
            .join("\n");
        for child in known.iter().filter(|k| k.strip_prefix(&format!("{m}::")).is_some_and(|c| !c.contains("::"))) {
            let name = child.rsplit("::").next().unwrap();
            let pat = format!("{name}::");
            let mut rest = body.as_str();
            while let Some(at) = rest.find(&pat) {
                let before = rest[..at].chars().last();
                if !before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                    uses.insert(child.clone());
                    break;
                }
                rest = &rest[at + pat.len()..];
            }
        }
        uses.remove(m);
        g.insert(m.clone(), uses);
    }
    g
}

fn find_cycle(g: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        u: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(u.to_string(), 1);
        stack.push(u.to_string());
        for v in g.get(u).into_iter().flatten() {
            match state.get(v.as_str()) {
                Some(1) => {
                    let at = stack.iter().position(|s| s == v).unwrap();
                    let mut cycle = stack[at..].to_vec();
                    cycle.push(v.clone());
                    return Some(cycle);
                }
                Some(_) => {}
                None => {
                    if let Some(c) = visit(v, g, state, stack) {
                        return Some(c);
                    }
                }
            }
        }
        stack.pop();
        state.insert(u.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for m in g.keys() {
        if !state.contains_key(m) {
            if let Some(c) = visit(m, g, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

#[test]
fn modules_form_no_cycle() {
    let g = graph();
    // The parser sees real uses (a guard against it silently seeing none).
    assert!(g["engine"].contains("model") && g["model::v7"].contains("ops"), "{g:#?}");
    assert!(g["gpu::recorder"].contains("gpu"), "super:: uses are seen: {g:#?}");
    if let Some(cycle) = find_cycle(&g) {
        panic!("module cycle: {}", cycle.join(" -> "));
    }
}

#[test]
fn the_cycle_finder_finds_cycles() {
    let mut g = BTreeMap::new();
    g.insert("a".to_string(), BTreeSet::from(["b".to_string()]));
    g.insert("b".to_string(), BTreeSet::from(["c".to_string()]));
    g.insert("c".to_string(), BTreeSet::from(["a".to_string()]));
    assert_eq!(find_cycle(&g).unwrap(), ["a", "b", "c", "a"]);
    g.get_mut("c").unwrap().clear();
    assert!(find_cycle(&g).is_none());
}
