//! Running the kernel tools (nft, iptables-restore, conntrack) with input on stdin.

use std::process::Stdio;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::error::DataplaneError;

/// How to install a missing tool on Debian-like systems.
pub(crate) fn install_hint(tool: &str) -> &'static str {
    if tool.starts_with("nft") {
        "install the nftables package (apt-get install nftables)"
    } else if tool.starts_with("ip6tables") || tool.starts_with("iptables") {
        "install the iptables package (apt-get install iptables)"
    } else if tool.starts_with("conntrack") {
        "install the conntrack package (apt-get install conntrack), or disable conntrack flushing"
    } else {
        "install it or put it on PATH"
    }
}

/// Output of a finished tool.
pub struct ToolOutput {
    pub status_ok: bool,
    pub stdout: String,
    pub stderr: String,
}

/// The longest a kernel tool may run (a full apply of 50,000 pods takes well under a
/// second); past it the tool is killed, which aborts its transaction, and the call fails.
pub const TOOL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// Runs `tool args...` feeding `stdin`, returning its output whatever the exit status. A tool
/// that has not finished within [`TOOL_TIMEOUT`] is killed.
pub async fn run_tool(
    tool: &str,
    args: &[&str],
    stdin: Option<&[u8]>,
) -> Result<ToolOutput, DataplaneError> {
    match tokio::time::timeout(TOOL_TIMEOUT, run_unbounded(tool, args, stdin)).await {
        Ok(r) => r,
        Err(_) => Err(DataplaneError::ToolTimeout {
            tool: tool.to_string(),
            args: args.join(" "),
            after: TOOL_TIMEOUT,
        }),
    }
}

async fn run_unbounded(
    tool: &str,
    args: &[&str],
    stdin: Option<&[u8]>,
) -> Result<ToolOutput, DataplaneError> {
    let mut cmd = Command::new(tool);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            DataplaneError::ToolMissing {
                tool: tool.to_string(),
                hint: install_hint(tool),
            }
        } else {
            DataplaneError::Io {
                tool: tool.to_string(),
                source,
            }
        }
    })?;
    if let Some(input) = stdin
        && let Some(mut pipe) = child.stdin.take()
    {
        pipe.write_all(input)
            .await
            .map_err(|source| DataplaneError::Io {
                tool: tool.to_string(),
                source,
            })?;
        drop(pipe);
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|source| DataplaneError::Io {
            tool: tool.to_string(),
            source,
        })?;
    Ok(ToolOutput {
        status_ok: out.status.success(),
        stdout: text(out.stdout),
        stderr: text(out.stderr),
    })
}

/// A tool's output as text, without a copy when it is valid UTF-8 (a listing can be
/// megabytes).
fn text(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// Runs a tool and fails with its stderr unless it exits 0; returns stdout.
pub(crate) async fn run_ok(
    tool: &str,
    args: &[&str],
    stdin: Option<&[u8]>,
) -> Result<String, DataplaneError> {
    let out = run_tool(tool, args, stdin).await?;
    if !out.status_ok {
        return Err(DataplaneError::ToolFailed {
            tool: tool.to_string(),
            args: args.join(" "),
            stderr: one_line(&out.stderr),
        });
    }
    Ok(out.stdout)
}

/// Folds a multi-line tool message into one line (operators read these in logs and events).
pub(crate) fn one_line(s: &str) -> String {
    let parts: Vec<&str> = s
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('^'))
        .collect();
    let joined = parts.join(" | ");
    if joined.len() > 600 {
        let mut cut = 600;
        while !joined.is_char_boundary(cut) {
            cut -= 1;
        }
        format!("{}…", &joined[..cut])
    } else {
        joined
    }
}
