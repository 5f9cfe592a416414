//! fluxd as a process: the data directory lock, the effective config line, signals and exit codes.
//! Tests that need the broker to run wait for its "mqtt listener bound" line.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// Generous: a debug build of fluxd on a loaded two-core CI machine.
const START_DEADLINE: Duration = Duration::from_secs(60);
const EXIT_DEADLINE: Duration = Duration::from_secs(30);

/// A running fluxd whose stdout and stderr lines arrive on one channel. Killed on drop.
struct Fluxd {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl Fluxd {
    fn start(args: &[&str], cwd: &Path) -> Fluxd {
        let mut child = Command::new(env!("CARGO_BIN_EXE_fluxd"))
            .args(args)
            .current_dir(cwd)
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn fluxd");
        let (tx, lines) = mpsc::channel();
        let out: Box<dyn Read + Send> = Box::new(child.stdout.take().unwrap());
        let err: Box<dyn Read + Send> = Box::new(child.stderr.take().unwrap());
        for stream in [out, err] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Fluxd {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for an output line containing `needle`; panics with all output on deadline or exit.
    fn wait_for_line(&mut self, needle: &str, deadline: Duration) -> String {
        let end = Instant::now() + deadline;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "no line containing {needle:?} within {deadline:?}; output:\n{}",
                        self.output()
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait();
                    panic!(
                        "fluxd exited ({status:?}) before printing {needle:?}; output:\n{}",
                        self.output()
                    )
                }
            }
        }
    }

    fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.pid() as libc::pid_t, signal) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    }

    /// Waits for the process to exit (polling its status against a deadline) and collects the
    /// rest of its output.
    fn wait_exit(&mut self, deadline: Duration) -> ExitStatus {
        let end = Instant::now() + deadline;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            assert!(
                Instant::now() < end,
                "fluxd did not exit within {deadline:?}; output:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        // Both pipes close at exit: drain what is left.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(line);
        }
        status
    }

    fn output(&self) -> String {
        self.seen.join("\n")
    }
}

impl Drop for Fluxd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run_to_exit(args: &[&str], cwd: &Path) -> (ExitStatus, String) {
    let mut fluxd = Fluxd::start(args, cwd);
    let status = fluxd.wait_exit(EXIT_DEADLINE);
    (status, fluxd.output())
}

/// Holds `<dir>/fluxd.lock` the way a running fluxd does, with `pid` written in it.
fn hold_lock(dir: &Path, pid: &str) -> std::fs::File {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    std::fs::create_dir_all(dir).unwrap();
    let mut file = std::fs::File::create(dir.join("fluxd.lock")).unwrap();
    // SAFETY: flock on a descriptor we own.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    assert_eq!(rc, 0);
    writeln!(file, "{pid}").unwrap();
    file
}

#[test]
fn locked_data_dir_is_refused_with_the_holders_pid() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let _lock = hold_lock(&data, "4242");
    let (status, output) = run_to_exit(
        &[
            "--mqtt-listen",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().unwrap(),
        ],
        tmp.path(),
    );
    assert_eq!(status.code(), Some(1), "{output}");
    let expected = format!(
        "data directory {} is locked by another fluxd (pid 4242)",
        data.display()
    );
    assert!(output.contains(&expected), "{output}");
    assert!(output.contains("ERROR"), "logged as an error: {output}");
    assert!(
        !output.contains("effective config"),
        "must fail before starting: {output}"
    );
}

#[test]
fn json_log_format_logs_errors_as_json() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let _lock = hold_lock(&data, "4242");
    let (status, output) = run_to_exit(
        &[
            "--log-format",
            "json",
            "--mqtt-listen",
            "127.0.0.1:0",
            "--data-dir",
            "data",
        ],
        tmp.path(),
    );
    assert_eq!(status.code(), Some(1), "{output}");
    let line = output
        .lines()
        .find(|l| l.contains("is locked by another fluxd"))
        .expect(&output);
    assert!(line.starts_with('{') && line.ends_with('}'), "{line}");
    assert!(line.contains(r#""level":"ERROR""#), "{line}");
}

#[test]
fn defaults_put_data_in_the_working_directory_and_log_the_effective_config() {
    let tmp = tempfile::tempdir().unwrap();
    let mut fluxd = Fluxd::start(&["--mqtt-listen", "127.0.0.1:0"], tmp.path());
    let line = fluxd.wait_for_line("effective config", START_DEADLINE);
    let cores = std::thread::available_parallelism().unwrap().get();
    assert!(
        line.contains(&format!("shards={cores}")),
        "one shard per core: {line}"
    );
    assert!(line.contains("data_dir=./data"), "{line}");
    assert!(
        line.contains("allow_anonymous=true"),
        "loopback allows anonymous: {line}"
    );
    assert!(line.contains("io_memory_bytes="), "{line}");
    assert!(
        line.contains("max_packet_size_bytes: 1048576"),
        "limits are in it: {line}"
    );
    let lock = std::fs::read_to_string(tmp.path().join("data/fluxd.lock")).unwrap();
    assert_eq!(lock.trim(), fluxd.pid().to_string());
}

#[test]
fn second_fluxd_on_the_same_data_dir_fails_and_sigterm_exits_zero() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let args = [
        "--mqtt-listen",
        "127.0.0.1:0",
        "--shards",
        "1",
        "--data-dir",
        data.to_str().unwrap(),
    ];
    let mut first = Fluxd::start(&args, tmp.path());
    first.wait_for_line("mqtt listener bound", START_DEADLINE);

    let (status, output) = run_to_exit(&args, tmp.path());
    assert_eq!(status.code(), Some(1), "{output}");
    let expected = format!(
        "data directory {} is locked by another fluxd (pid {})",
        data.display(),
        first.pid()
    );
    assert!(output.contains(&expected), "{output}");

    first.signal(libc::SIGTERM);
    let status = first.wait_exit(EXIT_DEADLINE);
    assert_eq!(
        status.code(),
        Some(0),
        "graceful shutdown exits 0; output:\n{}",
        first.output()
    );
    assert!(
        first.output().contains("shutting down gracefully"),
        "{}",
        first.output()
    );

    // The lock went with the process: a new fluxd can take the directory.
    let mut third = Fluxd::start(&args, tmp.path());
    third.wait_for_line("mqtt listener bound", START_DEADLINE);
}

#[test]
fn sigint_exits_zero() {
    let tmp = tempfile::tempdir().unwrap();
    let mut fluxd = Fluxd::start(
        &[
            "--mqtt-listen",
            "127.0.0.1:0",
            "--shards",
            "1",
            "--data-dir",
            "d",
        ],
        tmp.path(),
    );
    fluxd.wait_for_line("mqtt listener bound", START_DEADLINE);
    fluxd.signal(libc::SIGINT);
    let status = fluxd.wait_exit(EXIT_DEADLINE);
    assert_eq!(status.code(), Some(0), "output:\n{}", fluxd.output());
}
