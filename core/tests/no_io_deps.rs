//! Architecture invariant: flux-core has no I/O dependency. Its manifest may name only these.
#[test]
fn core_depends_only_on_pure_crates() {
    let manifest = include_str!("../Cargo.toml");
    let allowed = ["bytes", "thiserror", "serde", "rkyv", "proptest"];
    let mut in_deps = false;
    for line in manifest.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_deps = line.contains("dependencies");
            continue;
        }
        if in_deps && !line.is_empty() && !line.starts_with('#') {
            let name = line.split(['=', '.']).next().unwrap_or("").trim();
            assert!(allowed.contains(&name), "flux-core must not depend on `{name}`");
        }
    }
}
