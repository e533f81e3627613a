//! CLI manners: every command's `--help` ends with an example, the top-level help
//! documents the exit codes, and configuration files are accepted or refused as documented.

use std::path::Path;
use std::process::{Command, Output};

fn shardseal() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_shardseal"))
}

fn run(args: &[&str]) -> Output {
    Command::new(shardseal())
        .args(args)
        .env_remove("SHARDSEAL_LOG_FORMAT")
        .output()
        .expect("run shardseal")
}

/// The subcommand names listed under `Commands:` in a help text.
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_command_help_has_an_example() {
    let mut pending = vec![Vec::<String>::new()];
    let mut visited = 0;
    // The hidden `function` subcommand is started by the platform, not by people, but has
    // a help too.
    pending.push(vec!["function".to_owned()]);
    while let Some(path) = pending.pop() {
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.push("--help");
        let out = run(&args);
        assert!(out.status.success(), "{args:?}: exit {:?}", out.status);
        let help = String::from_utf8(out.stdout).unwrap();
        assert!(
            help.contains("\nExample"),
            "`shardseal {}` has no example in its help:\n{help}",
            path.join(" ")
        );
        assert!(help.contains("  shardseal "), "{help}");
        for sub in subcommands(&help) {
            let mut next = path.clone();
            next.push(sub);
            pending.push(next);
        }
        visited += 1;
    }
    // demo, up, infer, keys (+5), coordinator, broker, function, quoting-agent, audit (+2),
    // plan, usage, proxy, config (+2) and the top level.
    assert!(visited >= 20, "only {visited} commands walked");
}

#[test]
fn top_level_help_documents_exit_codes() {
    let help = String::from_utf8(run(&["--help"]).stdout).unwrap();
    for line in [
        "Exit codes:",
        "  0  success",
        "  1  the command failed",
        "  2  bad usage",
    ] {
        assert!(help.contains(line), "{line:?} missing from:\n{help}");
    }
    let out = run(&["plan", "--no-such-flag"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn every_role_example_is_accepted_and_bad_files_exit_2_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    for role in [
        "coordinator",
        "broker",
        "function",
        "quoting-agent",
        "up",
        "proxy",
    ] {
        let out = run(&["config", "example", "--role", role]);
        assert!(out.status.success(), "{role}");
        let example = String::from_utf8(out.stdout).unwrap();
        assert!(example.contains("# environment: SHARDSEAL_"), "{example}");
        let file = dir.path().join(format!("{role}.toml"));
        std::fs::write(&file, &example).unwrap();
        let out = run(&["config", "check", "--role", role, file.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{role}: {}\n{example}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "broker = \"https://127.0.0.1:1\"\npki = \"p\"\nmax_replicas = \"lots\"\n",
    )
    .unwrap();
    let out = run(&["coordinator", "--config", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.starts_with(&format!("error: {}: field `max_replicas`: ", bad.display())),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");

    std::fs::write(&bad, "colour = \"red\"\n").unwrap();
    let out = run(&["proxy", "--config", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.starts_with(&format!(
            "error: {}: unknown field `colour` for shardseal proxy",
            bad.display()
        )),
        "{stderr}"
    );

    // Precedence: flag > environment > file. The file's non-loopback listen address is
    // refused; a variable overrides it (the proxy then gets as far as the missing trust
    // file); a flag overrides the variable.
    std::fs::write(
        &bad,
        "coordinator = \"https://127.0.0.1:1\"\ntrust = \"no-such-trust.json\"\nlisten = \"0.0.0.0:0\"\n",
    )
    .unwrap();
    let proxy = |extra: &[&str], env: Option<&str>| {
        let mut command = Command::new(shardseal());
        command
            .args(["proxy", "--config", bad.to_str().unwrap()])
            .args(extra);
        if let Some(listen) = env {
            command.env("SHARDSEAL_PROXY_LISTEN", listen);
        }
        let out = command.output().unwrap();
        assert_eq!(out.status.code(), Some(1));
        String::from_utf8(out.stderr).unwrap()
    };
    let from_file = proxy(&[], None);
    assert!(
        from_file.contains("--listen 0.0.0.0:0: 0.0.0.0 is not a loopback"),
        "{from_file}"
    );
    let from_env = proxy(&[], Some("127.0.0.1:0"));
    assert!(from_env.contains("no-such-trust.json"), "{from_env}");
    let from_flag = proxy(&["--listen", "0.0.0.0:0"], Some("127.0.0.1:0"));
    assert!(
        from_flag.contains("0.0.0.0 is not a loopback"),
        "{from_flag}"
    );

    // A bad variable is named.
    std::fs::write(
        &bad,
        "coordinator = \"https://127.0.0.1:1\"\ntrust = \"t.json\"\n",
    )
    .unwrap();
    let out = Command::new(shardseal())
        .args(["proxy", "--config", bad.to_str().unwrap()])
        .env("SHARDSEAL_PROXY_ALLOW_REMOTE", "maybe")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.starts_with("error: environment variable SHARDSEAL_PROXY_ALLOW_REMOTE: "),
        "{stderr}"
    );
}
