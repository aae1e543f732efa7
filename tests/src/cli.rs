//! Helpers for the `omnibus` CLI end-to-end tests: run the binary to completion, follow a
//! long-running one line by line, and drive a full-screen one inside tmux.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::bin_path;

/// Settings the CLI would otherwise pick up from the test environment.
const CLI_ENV: &[&str] = &[
    "OMNIBUS_CONSUMER_ADDR",
    "OMNIBUS_DB_ADDR",
    "KAFKA_BROKERS",
    "KAFKA_TOPIC_PREFIX",
    "USE_EVENT_BUS_FOR_WRITES",
    "DB_BUS_REQUEST_TOPIC",
    "DB_BUS_COMPLETED_TOPIC",
    "DB_BUS_FAILED_TOPIC",
    "OMNIBUS_TOKEN",
    "OMNIBUS_CA_CERT",
    "OMNIBUS_TLS_DOMAIN",
    "KAFKA_CONFIG",
    "KAFKA_SECURITY_PROTOCOL",
];

/// The result of one CLI run.
#[derive(Debug)]
pub struct CliOutput {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }

    /// stdout parsed as JSON lines.
    pub fn json_lines(&self) -> Vec<serde_json::Value> {
        self.stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    }
}

fn command(args: &[&str]) -> Command {
    let mut cmd = Command::new(bin_path("omnibus"));
    for key in CLI_ENV {
        cmd.env_remove(key);
    }
    cmd.args(args).stdin(Stdio::null()).kill_on_drop(true);
    cmd
}

/// Runs `omnibus args...` to completion (stdout is a pipe, so the default output is JSON).
pub async fn omnibus(args: &[&str]) -> Result<CliOutput> {
    omnibus_with_env(args, &[]).await
}

/// [`omnibus`] with environment variables set.
pub async fn omnibus_with_env(args: &[&str], env: &[(&str, &str)]) -> Result<CliOutput> {
    let mut cmd = command(args);
    cmd.envs(env.iter().copied());
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .context("omnibus did not finish within 60 s")??;
    Ok(CliOutput {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// Runs `omnibus args...` with its stdout a pipe nobody reads (closed before it writes, as
/// `omnibus ... | head -0` would); returns its exit code.
pub async fn omnibus_stdout_closed(args: &[&str]) -> Result<Option<i32>> {
    let mut child = command(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("spawn omnibus")?;
    drop(child.stdout.take());
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .context("omnibus did not finish within 60 s")??;
    Ok(status.code())
}

/// A long-running `omnibus` (e.g. `tail`) whose output lines are collected as they come.
pub struct Following {
    child: Child,
    pub stdout: Lines,
    pub stderr: Lines,
}

/// A growing list of output lines, shared with the task that reads them.
#[derive(Clone, Default)]
pub struct Lines(Arc<Mutex<Vec<String>>>);

impl Lines {
    pub fn snapshot(&self) -> Vec<String> {
        self.0.lock().map(|l| l.clone()).unwrap_or_default()
    }
    pub fn push(&self, line: String) {
        if let Ok(mut l) = self.0.lock() {
            l.push(line);
        }
    }
}

impl Following {
    pub fn spawn(args: &[&str]) -> Result<Self> {
        let mut child = command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawn omnibus")?;
        let stdout = Lines::default();
        let stderr = Lines::default();
        for (pipe, lines) in [
            (
                child
                    .stdout
                    .take()
                    .map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
                stdout.clone(),
            ),
            (
                child
                    .stderr
                    .take()
                    .map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
                stderr.clone(),
            ),
        ] {
            let Some(pipe) = pipe else { continue };
            tokio::spawn(async move {
                let mut reader = BufReader::new(pipe).lines();
                while let Ok(Some(line)) = reader.next_line().await {
                    lines.push(line);
                }
            });
        }
        Ok(Self {
            child,
            stdout,
            stderr,
        })
    }

    /// Waits until `pred` holds for the stdout lines so far.
    pub async fn wait_stdout(
        &mut self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&[String]) -> bool,
    ) -> Result<Vec<String>> {
        let deadline = Instant::now() + timeout;
        loop {
            let lines = self.stdout.snapshot();
            if pred(&lines) {
                return Ok(lines);
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "omnibus exited ({status}) before {what}; stdout:\n{}\nstderr:\n{}",
                    lines.join("\n"),
                    self.stderr.snapshot().join("\n")
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "{what} not seen within {timeout:?}; stdout ({} lines):\n{}\nstderr:\n{}",
                    lines.len(),
                    lines
                        .iter()
                        .rev()
                        .take(20)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join("\n"),
                    self.stderr.snapshot().join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Sends signal `name` (`INT`, `TERM`) to the process.
    pub fn signal(&self, name: &str) -> Result<()> {
        let pid = self.pid().context("omnibus already exited")?;
        let status = std::process::Command::new("kill")
            .arg(format!("-{name}"))
            .arg(pid.to_string())
            .status()?;
        anyhow::ensure!(status.success(), "kill -{name} {pid} failed");
        Ok(())
    }

    /// Waits for the process to exit by itself.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .context("omnibus did not exit")?
            .context("wait for omnibus")
    }
}

/// A tmux session of its own (private socket), running one command in a fixed-size window.
pub struct Tmux {
    socket: String,
    session: String,
}

fn tmux_bin() -> Result<String> {
    let ok = std::process::Command::new("tmux")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        bail!("tmux is not installed (scripts/test installs Debian's tmux)");
    }
    Ok("tmux".into())
}

impl Tmux {
    /// Starts `command` (a shell command line) in a detached `width`x`height` session.
    pub fn start(command: &str, width: u16, height: u16) -> Result<Self> {
        let bin = tmux_bin()?;
        let id = uuid::Uuid::new_v4().simple().to_string();
        let t = Self {
            socket: format!("omnibus-test-{}", &id[..12]),
            session: "t".into(),
        };
        let status = std::process::Command::new(&bin)
            .args([
                "-L",
                &t.socket,
                "-f",
                "/dev/null",
                "new-session",
                "-d",
                "-s",
                &t.session,
            ])
            .args(["-x", &width.to_string(), "-y", &height.to_string()])
            .arg(command)
            .env("TERM", "xterm-256color")
            .env_remove("TMUX")
            .status()
            .context("start tmux")?;
        if !status.success() {
            bail!("tmux new-session failed: {status}");
        }
        Ok(t)
    }

    fn tmux(&self, args: &[&str]) -> Result<String> {
        let out = std::process::Command::new("tmux")
            .args(["-L", &self.socket])
            .args(args)
            .output()
            .context("run tmux")?;
        if !out.status.success() {
            bail!(
                "tmux {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The visible screen, as text.
    pub fn capture(&self) -> Result<String> {
        self.tmux(&["capture-pane", "-p", "-t", &self.session])
    }

    /// Types keys (tmux key names, e.g. "q", "C-c").
    pub fn send_keys(&self, keys: &str) -> Result<()> {
        self.tmux(&["send-keys", "-t", &self.session, keys])
            .map(|_| ())
    }

    /// Waits until the screen satisfies `pred`.
    pub async fn wait_screen(
        &self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&str) -> bool,
    ) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let screen = self.capture().unwrap_or_default();
            if pred(&screen) {
                return Ok(screen);
            }
            if Instant::now() >= deadline {
                bail!("{what} not on screen within {timeout:?}; screen:\n{screen}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = std::process::Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
