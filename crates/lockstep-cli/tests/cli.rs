//! The `lockstep` command against a real broker process: publish, tail, head, and one-line errors.
#![allow(clippy::unwrap_used)]

mod common;

use common::{BrokerProcess, assert_one_line_error, lockstep, run, stdout};

#[test]
fn publish_tail_and_head() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());
    let url = broker.url.as_str();

    let out = run(
        url,
        &[
            "--json",
            "publish",
            "account.opened",
            r#"{"owner":"ann"}"#,
            "--key",
            "a1",
            "--id",
            "e1",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let acks: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(acks[0]["position"], 1);

    let out = run(
        url,
        &[
            "publish",
            "funds.deposited",
            r#"{"amount":5}"#,
            "--key",
            "a1",
            "--expected-position",
            "1",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    assert!(stdout(&out).starts_with("position 2 "), "{}", stdout(&out));

    // Same id again: the original position, marked as already stored.
    let out = run(url, &["publish", "account.opened", "{}", "--id", "e1"]);
    assert!(stdout(&out).contains("position 1 ") && stdout(&out).contains("already stored"));

    let file = dir.path().join("events.json");
    std::fs::write(
        &file,
        r#"[{"type":"account.opened","key":"b"},{"type":"account.closed","key":"b"}]"#,
    )
    .unwrap();
    let out = run(url, &["publish", "--file", file.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout(&out).lines().count(), 2);

    let out = run(url, &["--json", "tail"]);
    let lines: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    assert_eq!(lines[1]["type"], "funds.deposited");
    assert_eq!(lines[1]["data"]["amount"], 5);

    let out = run(url, &["tail", "--types", "account.*", "--after", "1"]);
    let text = stdout(&out);
    assert_eq!(text.lines().count(), 2, "{text}");
    assert!(text.lines().all(|l| l.contains("account.")));

    let out = run(url, &["tail", "-n", "1"]);
    assert_eq!(stdout(&out).lines().count(), 1);

    let out = run(url, &["--json", "head"]);
    let head: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(head["position"], 4);
    assert_eq!(head["hash"], lines[3]["hash"]);
    broker.terminate();
}

#[test]
fn errors_are_one_line_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());
    let url = broker.url.as_str();

    assert_one_line_error(
        &run(url, &["publish", "Account.Opened", "{}"]),
        "invalid segment",
    );
    assert_one_line_error(&run(url, &["publish", "lockstep.barrier"]), "reserved");
    assert_one_line_error(
        &run(url, &["publish", "a.b", "not json"]),
        "DATA is not JSON",
    );
    assert_one_line_error(
        &run(url, &["publish", "a.b", "--expected-head", "9"]),
        "expected_head is 9",
    );
    assert_one_line_error(&run(url, &["tail", "--types", "A.B"]), "invalid segment");
    assert_one_line_error(&run(url, &["tail", "--after", "99"]), "past the head");
    assert_one_line_error(
        &run(url, &["publish", "--file", "/nonexistent/x.json"]),
        "reading /nonexistent/x.json",
    );
    let out = run(url, &["--json", "head"]);
    let head: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(head["position"], 0, "nothing was written");

    assert_one_line_error(&run("http://127.0.0.1:1", &["head"]), "unreachable");
    let out = lockstep()
        .args(["serve", "--config", "/nonexistent/lockstep.toml"])
        .output()
        .unwrap();
    assert_one_line_error(&out, "reading config file");
    broker.terminate();
}

#[test]
fn serve_settings_come_from_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("from-config");
    let config = dir.path().join("lockstep.toml");
    std::fs::write(
        &config,
        format!("data_dir = {:?}\nmax_body_bytes = 100\n", data),
    )
    .unwrap();
    let mut child = lockstep()
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !data.join("log.redb").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "config file's data_dir not used"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();

    std::fs::write(&config, "colour = \"red\"\n").unwrap();
    let out = lockstep()
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_one_line_error(&out, "colour");
}

#[test]
fn verify_prints_a_table_and_exits_1_on_divergence() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());
    let url = broker.url.as_str();
    let out = run(url, &["verify"]);
    assert!(out.status.success(), "no reports yet is not a failure");
    let out = run(url, &["--json", "barrier"]);
    let barrier: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let position = barrier["position"].as_u64().unwrap();
    // Three replicas report; the third disagrees.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let client = lockstep::Client::new(url).unwrap();
    let post = |replica: &str, hash: char| {
        let report = lockstep::StateReport {
            service: "bank".into(),
            replica: replica.into(),
            position,
            state_hash: hash.to_string().repeat(64),
            chain_hash: "0".repeat(64),
            buckets: None,
        };
        runtime.block_on(client.report_state(&report)).unwrap();
    };
    post("b-1", 'a');
    post("b-2", 'a');
    let out = run(url, &["verify"]);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout(&out).contains("verified"));
    post("b-3", 'b');
    let out = run(url, &["verify"]);
    assert_eq!(out.status.code(), Some(1), "divergence exits 1");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim(), "DIVERGED: replicas diverged: bank (b-3)");
    let unreachable = run("http://127.0.0.1:1", &["verify"]);
    assert_eq!(unreachable.status.code(), Some(2), "an error exits 2");
    assert_one_line_error(&unreachable, "unreachable");
    let table = stdout(&out);
    let b3 = table.lines().find(|l| l.contains("b-3")).unwrap();
    assert!(b3.contains("DIVERGED") && b3.contains("NO"), "{table}");

    let out = run(url, &["mark", "create", "before-bug", "--at", "head"]);
    assert!(
        stdout(&out).starts_with("mark before-bug at position"),
        "{out:?}"
    );
    assert_one_line_error(
        &run(url, &["mark", "create", "x", "--at", "soon"]),
        "--at takes",
    );
    let out = run(url, &["status"]);
    assert!(out.status.success(), "{out:?}");
    let screen = stdout(&out);
    for needle in [
        "log        head",
        "bank: DIVERGED, 3 replicas",
        "b-3 disagrees",
        "before-bug at",
    ] {
        assert!(
            screen.contains(needle),
            "{needle:?} missing from:\n{screen}"
        );
    }
    broker.terminate();
}

#[test]
fn rollback_pause_redrive_and_marks_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());
    let url = broker.url.as_str();
    for n in 1..=3 {
        let data = format!("{{\"n\":{n}}}");
        let out = run(url, &["publish", "good.thing", &data]);
        assert!(out.status.success(), "{out:?}");
    }
    let out = run(url, &["mark", "create", "good", "--at", "head"]);
    assert!(out.status.success(), "{out:?}");
    for n in 4..=5 {
        let data = format!("{{\"n\":{n}}}");
        run(url, &["publish", "bad.thing", &data]);
    }
    let out = run(url, &["rollback", "--to", "good", "--reason", "bad deploy"]);
    assert_eq!(
        stdout(&out).trim(),
        "rolled back to position 3 (mark good): record at 6, 2 events superseded"
    );
    assert_one_line_error(&run(url, &["rollback", "--to", "nope"]), "no mark named");
    assert_one_line_error(&run(url, &["rollback", "--to", "4"]), "superseded");

    let live = stdout(&run(url, &["tail"]));
    assert!(!live.contains("bad.thing"), "{live}");
    let audit = stdout(&run(url, &["tail", "--include-superseded"]));
    assert_eq!(
        audit.lines().filter(|l| l.ends_with("SUPERSEDED")).count(),
        2,
        "{audit}"
    );
    let list = stdout(&run(url, &["rollbacks"]));
    assert!(
        list.contains("bad deploy") && list.contains("2 events superseded"),
        "{list}"
    );

    let out = run(url, &["pause", "--reason", "maintenance"]);
    assert!(out.status.success(), "{out:?}");
    assert_one_line_error(&run(url, &["publish", "x.y", "{}"]), "paused");
    let screen = stdout(&run(url, &["status"]));
    for needle in [
        "PUBLISHING PAUSED",
        "maintenance",
        "rollbacks (1, 2 events superseded)",
    ] {
        assert!(
            screen.contains(needle),
            "{needle:?} missing from:\n{screen}"
        );
    }
    run(url, &["resume"]);
    let out = run(url, &["redrive", "--from", "4", "--to", "5"]);
    assert!(
        stdout(&out).contains("2 events redriven, 0 left out"),
        "{out:?}"
    );
    let live = stdout(&run(url, &["tail"]));
    assert_eq!(live.lines().filter(|l| l.contains("bad.thing")).count(), 2);

    let out = run(url, &["mark", "rm", "good"]);
    assert!(out.status.success(), "{out:?}");
    assert_one_line_error(&run(url, &["mark", "rm", "good"]), "no mark named");
    broker.terminate();
}
