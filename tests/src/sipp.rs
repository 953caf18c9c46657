//! SIPp runs for end-to-end tests: the `sipp` command, the path of a scenario kept in this
//! repository, and [`SippProcess`], one SIPp process writing its output (and, when the test asks
//! for them, its error log and message trace) to files in its own temporary directory, waited
//! for with a deadline and killed when dropped, so a panicking test never leaves SIPp running.
//!
//! It does not choose SIPp's arguments (each test keeps its scenario, rate, SIPp timeout and
//! target) nor interpret more of SIPp's output than its final call counters.

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How often [`SippProcess::wait`] checks whether SIPp exited.
const POLL: Duration = Duration::from_millis(10);

/// The `sipp` command; fails the test with a hint when SIPp is not installed.
pub fn sipp() -> Command {
    assert!(
        Command::new("sipp").arg("-v").output().is_ok(),
        "SIPp is not installed: run scripts/install-peers (Debian package sip-tester)"
    );
    Command::new("sipp")
}

/// Path of a SIPp scenario kept in `tests/scenarios/`.
pub fn scenario(name: &str) -> String {
    format!("{}/scenarios/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// The value of SIPp's last statistics line starting with `label` (e.g. `Successful call`),
/// or `None` when its output has none.
fn last_counter(output: &str, label: &str) -> Option<u64> {
    output
        .lines()
        .rev()
        .filter(|l| l.trim_start().starts_with(label))
        .find_map(|l| l.rsplit('|').next()?.trim().parse().ok())
}

/// The files of one SIPp run, in a temporary directory removed with the [`SippProcess`].
#[derive(Debug)]
pub struct SippFiles {
    dir: tempfile::TempDir,
}

impl SippFiles {
    /// Where SIPp's standard output goes (its statistics screens).
    fn output(&self) -> PathBuf {
        self.dir.path().join("sipp.out")
    }

    /// Where SIPp's standard error goes.
    fn stderr(&self) -> PathBuf {
        self.dir.path().join("sipp.err")
    }

    /// The path to give SIPp as `-trace_err -error_file <path>`; [`SippOutcome::errors`] is
    /// read from it.
    pub fn error_file(&self) -> PathBuf {
        self.dir.path().join("errors.log")
    }

    /// The path to give SIPp as `-trace_msg -message_file <path>`; [`SippOutcome::messages`]
    /// is read from it.
    pub fn message_file(&self) -> PathBuf {
        self.dir.path().join("messages.log")
    }
}

/// A running SIPp process: standard input closed, standard output and error in files of its
/// own directory. Killed (SIGKILL) and reaped when dropped.
#[derive(Debug)]
pub struct SippProcess {
    child: Child,
    files: SippFiles,
    started: Instant,
}

impl SippProcess {
    /// Spawns `command` (a [`sipp`] with the test's arguments).
    pub fn spawn(command: Command) -> Self {
        Self::spawn_with(|_| command)
    }

    /// Spawns the command `build` returns; `build` gets the run's files first, for the
    /// arguments that name them (`-error_file`, `-message_file`).
    pub fn spawn_with(build: impl FnOnce(&SippFiles) -> Command) -> Self {
        let files = SippFiles {
            dir: tempfile::tempdir().expect("a temporary directory for SIPp's files"),
        };
        let output = std::fs::File::create(files.output()).expect("creating sipp.out");
        let stderr = std::fs::File::create(files.stderr()).expect("creating sipp.err");
        let started = Instant::now();
        let mut command = build(&files);
        let child = command
            .stdin(Stdio::null())
            .stdout(output)
            .stderr(stderr)
            .spawn()
            .expect("spawning sipp");
        Self {
            child,
            files,
            started,
        }
    }

    /// Just before the command was built and SIPp spawned: SIPp sent nothing earlier.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Sends SIGKILL and reaps (nothing when it already exited).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits up to `timeout` for SIPp to exit (checking every 10 ms); kills and reaps it when
    /// it has not by then. Then reads its files.
    pub fn wait(mut self, timeout: Duration) -> SippOutcome {
        let deadline = Instant::now() + timeout;
        let (status, timed_out) = loop {
            if let Some(status) = self.child.try_wait().expect("polling sipp") {
                break (Some(status), false);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                break (self.child.wait().ok(), true);
            }
            std::thread::sleep(POLL);
        };
        let read = |path: PathBuf| std::fs::read_to_string(path).unwrap_or_default();
        let output = read(self.files.output());
        let counters =
            last_counter(&output, "Successful call").zip(last_counter(&output, "Failed call"));
        SippOutcome {
            successful: counters.map_or(0, |c| c.0),
            failed: counters.map_or(0, |c| c.1),
            counted: counters.is_some(),
            stderr: read(self.files.stderr()),
            errors: read(self.files.error_file()),
            messages: read(self.files.message_file()),
            output,
            status,
            timed_out,
            timeout,
        }
    }
}

impl Drop for SippProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What a SIPp run left: its final call counters and its files.
#[derive(Debug, Clone)]
pub struct SippOutcome {
    /// SIPp's final "Successful call" counter (0 when it printed none: see `counted`).
    pub successful: u64,
    /// SIPp's final "Failed call" counter (0 when it printed none: see `counted`).
    pub failed: u64,
    /// Whether SIPp's output held both counters (it did not when SIPp was killed before its
    /// first statistics screen).
    pub counted: bool,
    /// SIPp's standard output.
    pub output: String,
    /// SIPp's standard error.
    pub stderr: String,
    /// SIPp's error log (empty unless the test gave it [`SippFiles::error_file`]).
    pub errors: String,
    /// SIPp's message trace (empty unless the test gave it [`SippFiles::message_file`]).
    pub messages: String,
    /// How SIPp exited (after the kill when it timed out; `None` when it could not be reaped).
    pub status: Option<ExitStatus>,
    /// Whether SIPp was still running at the deadline and was killed.
    pub timed_out: bool,
    /// The deadline the test gave [`SippProcess::wait`].
    timeout: Duration,
}

impl SippOutcome {
    /// (successful, failed); panics with the report when SIPp's output held no counters.
    pub fn counts(&self) -> (u64, u64) {
        assert!(
            self.counted,
            "no \"Successful call\" and \"Failed call\" in SIPp's output\n{}",
            self.report()
        );
        (self.successful, self.failed)
    }

    /// One line on how SIPp ended: its exit status, or that it was killed at the deadline.
    pub fn ending(&self) -> String {
        if self.timed_out {
            format!("SIPp was still running after {:?}: killed", self.timeout)
        } else {
            match self.status {
                Some(status) => format!("SIPp exited: {status}"),
                None => "SIPp's exit status is unknown".to_string(),
            }
        }
    }

    /// For assertion messages: how SIPp ended, its counters, and its output, standard error
    /// and error log (each when not empty).
    pub fn report(&self) -> String {
        let mut report = format!(
            "{}; {} successful, {} failed calls{}",
            self.ending(),
            self.successful,
            self.failed,
            if self.counted {
                ""
            } else {
                " (no counters in its output)"
            }
        );
        for (name, text) in [
            ("output", &self.output),
            ("standard error", &self.stderr),
            ("error log", &self.errors),
        ] {
            if !text.is_empty() {
                report.push_str(&format!("\nSIPp's {name}:\n{text}"));
            }
        }
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCREEN: &str = "\
  Successful call        |        0                  |        0\n\
  Failed call            |        0                  |        0\n\
------------------------------ Test Terminated --------------------------------\n\
  Successful call        |        3                  |      198\n\
  Failed call            |        1                  |        2\n";

    #[test]
    fn the_last_counters_count() {
        assert_eq!(last_counter(SCREEN, "Successful call"), Some(198));
        assert_eq!(last_counter(SCREEN, "Failed call"), Some(2));
        assert_eq!(last_counter("Resolving remote host", "Failed call"), None);
    }

    #[test]
    fn a_process_past_its_deadline_is_killed_and_says_so() {
        let run = SippProcess::spawn({
            let mut c = Command::new("sleep");
            c.arg("30");
            c
        });
        let started = Instant::now();
        let outcome = run.wait(Duration::from_millis(100));
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(outcome.timed_out);
        assert!(!outcome.counted);
        assert!(outcome.report().contains("killed"), "{}", outcome.report());
    }

    #[test]
    fn an_exited_process_s_output_is_read() {
        let run = SippProcess::spawn({
            let mut c = Command::new("printf");
            c.arg(SCREEN);
            c
        });
        let outcome = run.wait(Duration::from_secs(10));
        assert!(!outcome.timed_out);
        assert!(outcome.status.unwrap().success());
        assert_eq!(outcome.counts(), (198, 2));
    }
}
