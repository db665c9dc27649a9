//! `lockstep subs` against a real broker process: add (idempotent, conflicts), ls, show, rm.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Output;

use common::{BrokerProcess, assert_one_line_error, run, stdout};

fn json(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "{out:?}");
    serde_json::from_str(&stdout(out)).unwrap()
}

#[test]
fn add_list_show_and_remove_a_subscription() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());
    let url = broker.url.as_str();
    for i in 0..3 {
        let out = run(
            url,
            &["publish", "account.opened", &format!("{{\"n\":{i}}}")],
        );
        assert!(out.status.success(), "{out:?}");
    }

    let add = [
        "subs",
        "add",
        "bank",
        "b-1",
        "--types",
        "account.*,funds.deposited",
        "--start",
        "2",
    ];
    let out = run(url, &add);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout(&out).starts_with("created bank/b-1"),
        "{}",
        stdout(&out)
    );

    let out = run(url, &add);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout(&out).contains("already existed"), "{}", stdout(&out));

    let mut again = vec!["--json"];
    again.extend_from_slice(&add);
    let answer = json(&run(url, &again));
    assert_eq!(answer["created"], false);
    assert_eq!(answer["subscription"]["service"], "bank");

    // Same service and replica, different types: refused without --replace, nothing changes.
    let different = [
        "subs",
        "add",
        "bank",
        "b-1",
        "--types",
        "billing.*",
        "--start",
        "now",
    ];
    assert_one_line_error(&run(url, &different), "--replace");

    let list = json(&run(url, &["--json", "subs", "ls"]));
    let subs = list["subscriptions"].as_array().unwrap();
    assert_eq!(subs.len(), 1, "{list}");
    assert_eq!(subs[0]["replica"], "b-1");
    assert_eq!(subs[0]["types"][0], "account.*");
    assert_eq!(subs[0]["start"]["position"], 2);
    // Starting at position 2 means everything before it counts as acknowledged.
    assert_eq!(subs[0]["position"], 1);
    assert_eq!(subs[0]["lag_events"], 2);
    assert_eq!(list["head"], 3);

    // The bare command lists as a table.
    let out = run(url, &["subs"]);
    assert!(out.status.success(), "{out:?}");
    let text = stdout(&out);
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "SERVICE",
            "REPLICA",
            "TYPES",
            "MODE",
            "POSITION",
            "LAG(events)",
            "LAG(s)",
            "STATE"
        ]
    );
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        row[..6],
        ["bank", "b-1", "account.*,funds.deposited", "pull", "1", "2"]
    );

    let shown = json(&run(url, &["--json", "subs", "show", "bank", "b-1"]));
    assert_eq!(shown["position"], 1);
    let out = run(url, &["subs", "show", "bank", "b-1"]);
    assert!(
        stdout(&out).contains("mode           pull"),
        "{}",
        stdout(&out)
    );

    let out = run(url, &["subs", "rm", "bank", "b-1"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout(&out).trim(), "removed bank/b-1");
    let list = json(&run(url, &["--json", "subs", "ls"]));
    assert_eq!(list["subscriptions"].as_array().unwrap().len(), 0);

    assert_one_line_error(&run(url, &["subs", "rm", "bank", "b-1"]), "bank/b-1");
    assert_one_line_error(&run(url, &["subs", "show", "bank", "b-1"]), "404");
    assert_one_line_error(
        &run(url, &["subs", "add", "bank", "b/2", "--types", "*"]),
        "replica",
    );
    broker.terminate();
}
