//! fluxd's command line and config file errors: everything here fails (or prints) before the
//! broker runtime starts, so none of it needs a running broker.

use std::path::Path;
use std::process::{Command, Output};

fn fluxd(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fluxd"))
        .args(args)
        .current_dir(cwd)
        .env_remove("RUST_LOG")
        .output()
        .expect("run fluxd")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn help_lists_every_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let out = fluxd(&["--help"], tmp.path());
    assert!(out.status.success(), "{out:?}");
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--config",
        "--mqtt-listen",
        "--data-dir",
        "--shards",
        "--allow-anonymous",
        "--log-level",
        "--log-format",
        "--help",
        "--version",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}:\n{help}");
    }
    assert!(
        !tmp.path().join("data").exists(),
        "--help must not touch the data directory"
    );
}

#[test]
fn version_prints_the_crate_version() {
    let tmp = tempfile::tempdir().unwrap();
    let out = fluxd(&["--version"], tmp.path());
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.trim(), format!("fluxd {}", env!("CARGO_PKG_VERSION")));
}

#[test]
fn unknown_config_key_fails_naming_the_key_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("fluxd.toml");
    std::fs::write(
        &path,
        "shards = 1\n[limits]\nmax_packet_size_bytes = 1024\nmax_widgets = 3\n",
    )
    .unwrap();
    let out = fluxd(&["--config", path.to_str().unwrap()], tmp.path());
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = stderr(&out);
    assert!(err.contains("max_widgets"), "{err}");
    assert!(err.contains(&format!("{}:4:1", path.display())), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(
        !tmp.path().join("data").exists(),
        "a bad config must fail before any side effect"
    );
}

#[test]
fn missing_config_file_fails_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let out = fluxd(&["--config", "nope.toml"], tmp.path());
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        stderr(&out).contains("cannot read config file nope.toml"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn non_loopback_listener_without_allow_anonymous_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = fluxd(&["--mqtt-listen", "0.0.0.0:0"], tmp.path());
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = stderr(&out);
    assert!(err.contains("0.0.0.0:0 is not a loopback address"), "{err}");
    assert!(err.contains("allow_anonymous = true"), "{err}");
    assert!(err.contains("--allow-anonymous"), "{err}");
    assert!(!tmp.path().join("data").exists());

    // The same from the config file.
    let path = tmp.path().join("fluxd.toml");
    std::fs::write(&path, "[mqtt]\nlisten = \"[::]:0\"\n").unwrap();
    let out = fluxd(&["--config", path.to_str().unwrap()], tmp.path());
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        stderr(&out).contains("[::]:0 is not a loopback address"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn invalid_flag_values_are_usage_errors() {
    let tmp = tempfile::tempdir().unwrap();
    for args in [
        &["--mqtt-listen", "localhost"][..],
        &["--shards", "-1"],
        &["--log-format", "xml"],
        &["--no-such-flag"],
    ] {
        let out = fluxd(args, tmp.path());
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
    }
    let out = fluxd(&["--log-level", "info,[bad"], tmp.path());
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        stderr(&out).contains("invalid log level"),
        "{}",
        stderr(&out)
    );
    assert!(!tmp.path().join("data").exists());
}
