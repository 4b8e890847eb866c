//! `tollgate demo` as a new user meets it: the real binary, its printed
//! curl lines run with the real `curl` exactly as printed, and Ctrl-C
//! (SIGINT) ending it with exit 0.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use support::*;

/// The status a demo case's comment promises: "allowed: …" is 200, the
/// others start with their status ("401 missing_token: …").
fn promised(comment: &str) -> u16 {
    if comment.starts_with("allowed") {
        200
    } else {
        comment[..3]
            .parse()
            .expect("a case comment starts with its status")
    }
}

#[test]
fn demo_prints_curl_lines_that_get_the_status_they_promise() {
    let mut child = Command::new(bin())
        .arg("demo")
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.unwrap_or_default()).is_err() {
                break;
            }
        }
    });
    // Read until the admin section, which follows the last case.
    let mut out = Vec::new();
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("demo printed no 'Admin API:' section");
        let done = line == "Admin API:";
        out.push(line);
        if done {
            break;
        }
    }
    let text = out.join("\n");
    // Each case: a "  # what  [status]" line, then its curl line.
    let mut cases = Vec::new();
    for (i, line) in out.iter().enumerate() {
        let Some(comment) = line.trim().strip_prefix("# ") else {
            continue;
        };
        let (what, got) = comment
            .rsplit_once("  [")
            .expect("[status] after the comment");
        let got: u16 = got.trim_end_matches(']').parse().unwrap();
        let curl = out[i + 1].trim().to_string();
        assert!(curl.starts_with("curl "), "{text}");
        cases.push((what.to_string(), got, curl));
    }
    let codes: Vec<u16> = cases.iter().map(|c| promised(&c.0)).collect();
    assert_eq!(
        codes,
        [200, 401, 401, 403, 403, 404, 400, 403, 502, 504],
        "an allowed call and each kind of rejection: {text}"
    );
    for (what, got, curl) in &cases {
        assert_eq!(*got, promised(what), "the demo's own call: {what}\n{text}");
        // The line as printed, run by a shell, as a user would paste it.
        let run = Command::new("sh")
            .arg("-c")
            .arg(format!("{curl} -s -o /dev/null -w '%{{http_code}}'"))
            .output()
            .unwrap();
        let status = String::from_utf8_lossy(&run.stdout);
        assert_eq!(
            status.trim(),
            promised(what).to_string(),
            "{curl}\n{}",
            String::from_utf8_lossy(&run.stderr)
        );
    }
    // The allowed call reaches the CRM echo backend with the identity headers.
    let allowed = &cases[0].2;
    let body = Command::new("sh")
        .arg("-c")
        .arg(allowed.replacen("curl -i ", "curl -s ", 1))
        .output()
        .unwrap();
    let echo: serde_json::Value = serde_json::from_slice(&body.stdout).unwrap();
    assert_eq!(echo["backend"], "crm", "{echo}");
    assert_eq!(echo["headers"]["x-tollgate-tenant"], "acme", "{echo}");
    assert!(echo["headers"].get("authorization").is_none(), "{echo}");

    // Ctrl-C ends it cleanly.
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "demo ignored SIGINT");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0));
}
