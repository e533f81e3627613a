//! Configuration files, environment overrides and the global `--log-format`, in one
//! mechanism over the commands' own clap arguments.
//!
//! A service role (`coordinator`, `broker`, `function`, `quoting-agent`, `up`, `proxy`)
//! takes `--config FILE`: a TOML file whose keys are the role's long flag names (`_` or
//! `-`), for example `max_replicas = 8` for `--max-replicas 8`. Each setting may also come
//! from the environment as `SHARDSEAL_<ROLE>_<FLAG>` (e.g. `SHARDSEAL_COORDINATOR_MAX_REPLICAS`;
//! a flag that documents its own `env` keeps that name). Precedence: flag > environment >
//! file > built-in default. Values from a file or the environment are turned into the flags
//! they stand for and checked by the flag's own parser before the command starts, so
//! defaults and validation live in one place (the clap arguments) and an error names the
//! file (or variable) and the field.
//!
//! ```text
//!  argv ──┐
//!  env  ──┼──▶ argv' (flags added for what the user did not give) ──▶ clap ──▶ command
//!  FILE ──┘
//! ```

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Arg, ArgAction, Command, CommandFactory, FromArgMatches};
use shardseal_function::{LOG_FORMAT_ENV, LogFormat};

/// The commands that read `--config FILE` and `SHARDSEAL_<ROLE>_<FLAG>` variables.
pub(crate) const ROLES: &[&str] = &[
    "coordinator",
    "broker",
    "function",
    "quoting-agent",
    "up",
    "proxy",
];

/// What `shardseal --help` says about exit codes (also in docs/operator.md).
pub(crate) const EXIT_CODES: &str = "Examples:\n  shardseal demo\n  shardseal up --state state --deploy resnet=2\n  shardseal --log-format json coordinator --config coordinator.toml\n\nExit codes:\n  0  success\n  1  the command failed (one line on stderr: what failed, then its causes)\n  2  bad usage: an unknown flag or a bad value on the command line, in a --config file\n     or in a SHARDSEAL_* variable (the message names the flag, file or variable)\n\nEvery command's --help ends with an example. Service roles (coordinator, broker,\nfunction, quoting-agent, up, proxy) read --config FILE and SHARDSEAL_<ROLE>_<FLAG>\nvariables: `shardseal config example --role ROLE` prints a commented file.";

/// Settings that hold for the whole process, whatever the command.
pub(crate) struct Global {
    /// How log lines are written.
    pub(crate) log_format: LogFormat,
}

/// `shardseal config`: print or check configuration files.
#[derive(Debug, clap::Subcommand)]
#[command(
    after_help = "Example:\n  shardseal config example --role broker > broker.toml\n  shardseal config check --role broker broker.toml"
)]
pub(crate) enum ConfigCommand {
    /// Print a complete, commented configuration file for a role, with every default;
    /// it is accepted as is by `--config`.
    #[command(
        after_help = "Example:\n  shardseal config example --role coordinator > coordinator.toml\n  shardseal coordinator --config coordinator.toml"
    )]
    Example {
        /// The role (coordinator, broker, function, quoting-agent, up, proxy).
        #[arg(long, default_value = "coordinator", value_parser = clap::builder::PossibleValuesParser::new(ROLES))]
        role: String,
    },
    /// Check a configuration file (and SHARDSEAL_<ROLE>_* variables) as the role would read
    /// it at start, without starting anything.
    #[command(
        after_help = "Example:\n  shardseal config check --role coordinator coordinator.toml"
    )]
    Check {
        /// The role the file is for.
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(ROLES))]
        role: String,
        /// The TOML file.
        file: PathBuf,
    },
}

/// Runs `shardseal config`.
pub(crate) fn run(config: ConfigCommand) -> anyhow::Result<()> {
    match config {
        ConfigCommand::Example { role } => {
            print!("{}", example(&role)?);
            Ok(())
        }
        ConfigCommand::Check { role, file } => {
            let argv: Vec<OsString> = ["shardseal", role.as_str(), "--config"]
                .into_iter()
                .map(OsString::from)
                .chain([file.clone().into_os_string()])
                .collect();
            let argv = expand(&self::command(), argv).map_err(|e| anyhow::anyhow!("{e}"))?;
            let matches = self::command()
                .try_get_matches_from(&argv)
                .map_err(|e| anyhow::anyhow!("{}", first_line(&e.to_string())))?;
            crate::Cli::from_arg_matches(&matches)
                .map_err(|e| anyhow::anyhow!("{}", first_line(&e.to_string())))?;
            if role == "broker" {
                broker_file_config(&file)?;
            }
            println!("{}: a valid {role} configuration", file.display());
            Ok(())
        }
    }
}

/// The `shardseal` command with what this module adds: the global `--log-format`, a
/// `--config` flag on every role, the exit codes in the top-level help.
pub(crate) fn command() -> Command {
    let mut cmd = crate::Cli::command()
        .arg(
            Arg::new("log_format")
                .long("log-format")
                .global(true)
                .env(LOG_FORMAT_ENV)
                .value_name("FORMAT")
                .value_parser(["text", "json"])
                .default_value("text")
                .help("Log lines as text, or as JSON objects (one per line, with the request id); inherited by the services and functions this command starts"),
        )
        .after_help(EXIT_CODES);
    for role in ROLES {
        // The broker's own --config (its BrokerConfig file) takes the same keys and more.
        if *role == "broker" {
            continue;
        }
        cmd = cmd.mut_subcommand(role, |sub| {
            sub.arg(
                Arg::new("config")
                    .long("config")
                    .value_name("FILE")
                    .help(format!(
                        "A TOML file of settings: keys are this command's long flag names. Precedence: flag > SHARDSEAL_{}_<FLAG> variable > file > default. See `shardseal config example --role {role}`",
                        env_role(role)
                    )),
            )
        });
    }
    cmd
}

/// Parses the command line with `--config` files and `SHARDSEAL_*` variables applied.
/// Help and version requests exit 0 here; any usage or configuration error exits 2 with
/// one line on stderr.
pub(crate) fn parse() -> Result<(crate::Cli, Global), ExitCode> {
    let cmd = command();
    let argv = match expand(&cmd, std::env::args_os().collect()) {
        Ok(argv) => argv,
        Err(e) => {
            eprintln!("error: {e}");
            return Err(ExitCode::from(2));
        }
    };
    let matches = cmd.try_get_matches_from(argv).unwrap_or_else(|e| e.exit());
    let cli = crate::Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let log_format = matches
        .get_one::<String>("log_format")
        .and_then(|f| f.parse().ok())
        .unwrap_or_default();
    if matches.value_source("log_format") == Some(clap::parser::ValueSource::CommandLine) {
        pass_log_format_on(log_format);
    }
    Ok((cli, Global { log_format }))
}

/// Makes the processes this one starts (services, functions) log in the same format.
#[allow(unsafe_code)]
fn pass_log_format_on(format: LogFormat) {
    let value = match format {
        LogFormat::Text => "text",
        LogFormat::Json => "json",
    };
    // SAFETY: called from `main` right after parsing the command line, before the async
    // runtime or any other thread exists, so nothing reads the environment concurrently.
    unsafe { std::env::set_var(LOG_FORMAT_ENV, value) };
}

/// The leaf subcommand named on `argv` (e.g. `["keys", "provision"]`) and the index just
/// after its name.
fn leaf<'a>(cmd: &'a Command, argv: &[OsString]) -> (Vec<&'a Command>, usize) {
    let mut path = vec![cmd];
    let mut index = 1;
    let mut after_leaf = 1;
    let mut current = cmd;
    while index < argv.len() {
        let token = argv[index].to_string_lossy();
        if token == "--log-format" {
            index += 2;
            continue;
        }
        if token.starts_with('-') {
            index += 1;
            continue;
        }
        match current.find_subcommand(token.as_ref()) {
            Some(sub) => {
                path.push(sub);
                current = sub;
                index += 1;
                after_leaf = index;
            }
            None => break,
        }
    }
    (path, after_leaf)
}

/// `SHARDSEAL_QUOTING_AGENT`-style prefix part of a role.
fn env_role(role: &str) -> String {
    role.to_ascii_uppercase().replace('-', "_")
}

/// The variable that sets `arg` of `role`: the flag's own `env`, else
/// `SHARDSEAL_<ROLE>_<FLAG>`.
fn env_name(role: &str, arg: &Arg) -> Option<String> {
    if let Some(env) = arg.get_env() {
        return Some(env.to_string_lossy().into_owned());
    }
    let long = arg.get_long()?;
    Some(format!(
        "SHARDSEAL_{}_{}",
        env_role(role),
        long.to_ascii_uppercase().replace('-', "_")
    ))
}

/// The flags a settings file may set: long, not positional, not help/version/config.
fn settable(cmd: &Command) -> impl Iterator<Item = &Arg> {
    cmd.get_arguments().filter(|a| {
        a.get_long().is_some()
            && !a.is_positional()
            && !matches!(
                a.get_id().as_str(),
                "help" | "version" | "config" | "log_format"
            )
            && !matches!(a.get_action(), ArgAction::Help | ArgAction::Version)
    })
}

fn takes_many_values(arg: &Arg) -> bool {
    arg.get_num_args().is_some_and(|n| n.max_values() > 1)
}

fn is_flag(arg: &Arg) -> bool {
    matches!(arg.get_action(), ArgAction::SetTrue)
}

/// Where a setting came from, for error messages.
enum Source<'a> {
    File(&'a Path, &'a str),
    Env(&'a str),
}

impl std::fmt::Display for Source<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::File(path, key) => write!(f, "{}: field `{key}`", path.display()),
            Source::Env(name) => write!(f, "environment variable {name}"),
        }
    }
}

/// `argv` with flags added for the settings of the role's `--config` file and
/// `SHARDSEAL_<ROLE>_*` variables that the command line does not give.
pub(crate) fn expand(cmd: &Command, argv: Vec<OsString>) -> anyhow::Result<Vec<OsString>> {
    let (path, after_leaf) = leaf(cmd, &argv);
    let Some(leaf_cmd) = path.last().copied().filter(|_| path.len() == 2) else {
        return Ok(argv);
    };
    let role = leaf_cmd.get_name();
    if !ROLES.contains(&role) {
        return Ok(argv);
    }
    let given = given_flags(&argv[after_leaf..]);
    let config_file = flag_value(&argv[after_leaf..], "--config")
        .map(PathBuf::from)
        .or_else(|| {
            let name = format!("SHARDSEAL_{}_CONFIG", env_role(role));
            std::env::var_os(name).map(PathBuf::from)
        });
    let table = match &config_file {
        Some(path) => read_table(path)?,
        None => toml::Table::new(),
    };
    let args: Vec<&Arg> = settable(leaf_cmd).collect();
    // Every key must name a flag (the broker's file may also hold its BrokerConfig keys,
    // which its own loader checks).
    if let Some(path) = &config_file {
        for key in table.keys() {
            let long = key.replace('_', "-");
            if !args.iter().any(|a| a.get_long() == Some(long.as_str())) && role != "broker" {
                let known: Vec<String> = args
                    .iter()
                    .filter_map(|a| a.get_long())
                    .map(|l| l.replace('-', "_"))
                    .collect();
                bail!(
                    "{}: unknown field `{key}` for shardseal {role} (known fields: {})",
                    path.display(),
                    known.join(", ")
                );
            }
        }
    }
    let mut single: Vec<OsString> = Vec::new();
    let mut multi: Vec<OsString> = Vec::new();
    for arg in args {
        let Some(long) = arg.get_long() else { continue };
        if given.contains(long) {
            continue;
        }
        let env = env_name(role, arg);
        let from_env = env.as_ref().and_then(|name| std::env::var(name).ok());
        let (values, source) = if let Some(value) = from_env {
            if arg.get_env().is_some() {
                // clap reads a flag's own variable itself, after the command line.
                continue;
            }
            let name = env.as_deref().unwrap_or_default();
            (vec![value], Source::Env(name))
        } else if let (Some(path), Some((key, value))) = (
            &config_file,
            table.iter().find(|(k, _)| k.replace('_', "-") == long),
        ) {
            (toml_values(value, path, key)?, Source::File(path, key))
        } else {
            continue;
        };
        let flag = format!("--{long}");
        if is_flag(arg) {
            let on = match values.as_slice() {
                [v] if matches!(v.as_str(), "true" | "1" | "yes") => true,
                [v] if matches!(v.as_str(), "false" | "0" | "no") => false,
                _ => bail!("{source}: expected true or false"),
            };
            if on {
                single.push(flag.into());
            }
            continue;
        }
        for value in &values {
            check_value(arg, value).map_err(|e| anyhow::anyhow!("{source}: {e}"))?;
        }
        if takes_many_values(arg) {
            multi.push(flag.into());
            multi.extend(values.into_iter().map(OsString::from));
        } else {
            if values.len() > 1 && !matches!(arg.get_action(), ArgAction::Append) {
                bail!("{source}: takes one value, not a list");
            }
            for value in values {
                single.push(flag.clone().into());
                single.push(value.into());
            }
        }
    }
    let mut out = argv[..after_leaf].to_vec();
    out.extend(single);
    out.extend(argv[after_leaf..].iter().cloned());
    // Last: a flag with several values takes every argument after it.
    out.extend(multi);
    Ok(out)
}

/// The long flags given on the command line (`--name` or `--name=value`).
fn given_flags(tokens: &[OsString]) -> BTreeSet<String> {
    tokens
        .iter()
        .filter_map(|t| t.to_str())
        .filter_map(|t| t.strip_prefix("--"))
        .map(|t| t.split('=').next().unwrap_or(t).to_owned())
        .collect()
}

fn flag_value(tokens: &[OsString], flag: &str) -> Option<OsString> {
    let prefix = format!("{flag}=");
    for (i, token) in tokens.iter().enumerate() {
        let text = token.to_string_lossy();
        if text == flag {
            return tokens.get(i + 1).cloned();
        }
        if let Some(value) = text.strip_prefix(&prefix) {
            return Some(value.into());
        }
    }
    None
}

fn read_table(path: &Path) -> anyhow::Result<toml::Table> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the configuration file {}", path.display()))?;
    text.parse::<toml::Table>()
        .map_err(|e| anyhow::anyhow!("{}: not valid TOML: {}", path.display(), e.message()))
}

/// The flag values a TOML value stands for.
fn toml_values(value: &toml::Value, path: &Path, key: &str) -> anyhow::Result<Vec<String>> {
    let scalar = |v: &toml::Value| -> anyhow::Result<String> {
        Ok(match v {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            _ => bail!(
                "{}: field `{key}` must be a string, number or boolean",
                path.display()
            ),
        })
    };
    match value {
        toml::Value::Array(items) => items.iter().map(scalar).collect(),
        other => Ok(vec![scalar(other)?]),
    }
}

/// Runs the flag's own parser on `value`, so a bad setting is refused before anything
/// starts, with the flag's usual message.
fn check_value(arg: &Arg, value: &str) -> Result<(), String> {
    // A lone copy of the flag: the original's relations to other flags do not matter here.
    let long = arg.get_long().unwrap_or("value");
    let lone = Arg::new("value")
        .long("value")
        .value_name("VALUE")
        .action(ArgAction::Set)
        .value_parser(arg.get_value_parser().clone());
    Command::new("check")
        .no_binary_name(true)
        .arg(lone)
        .try_get_matches_from([OsString::from("--value"), OsString::from(value)])
        .map(|_| ())
        .map_err(|e| first_line(&e.to_string()).replace("--value", &format!("--{long}")))
}

fn first_line(text: &str) -> String {
    let line = text.lines().next().unwrap_or(text);
    line.strip_prefix("error: ").unwrap_or(line).to_owned()
}

/// Reads the broker's `--config` file: the flags' keys (taken by [`expand`]) are dropped,
/// the rest is its `BrokerConfig` (unknown keys refused, naming the file and field).
pub(crate) fn broker_file_config(
    path: &Path,
) -> anyhow::Result<shardseal_keys::broker::BrokerConfig> {
    let mut table = read_table(path)?;
    let cmd = command();
    if let Some(broker) = cmd.find_subcommand("broker") {
        for arg in settable(broker) {
            if let Some(long) = arg.get_long() {
                table.remove(&long.replace('-', "_"));
                table.remove(long);
            }
        }
    }
    toml::Value::Table(table)
        .try_into()
        .map_err(|e: toml::de::Error| {
            anyhow::anyhow!(
                "{}: not a valid broker configuration: {}",
                path.display(),
                e.message()
            )
        })
}

/// Example values for required settings without a default, so the example file is
/// accepted as printed.
fn example_value(role: &str, long: &str) -> Option<&'static str> {
    Some(match (role, long) {
        (_, "broker") => "https://127.0.0.1:7000",
        (_, "pki") => "state/pki",
        ("function", "agent-socket") => "state/agent/agent.sock",
        ("function", "store") => "state/store",
        ("function", "model") => "demo-cnn",
        ("function", "stage") => "0",
        ("quoting-agent", "socket") => "state/agent/agent.sock",
        ("quoting-agent", "key") => "state/agent/platform.key",
        ("proxy", "coordinator") => "https://127.0.0.1:7443",
        ("proxy", "trust") => "state/trust.json",
        _ => return None,
    })
}

/// A TOML literal for a flag value: numbers and booleans bare, the rest quoted.
fn literal(value: &str) -> String {
    let bare = value.parse::<i64>().is_ok()
        || value.parse::<f64>().is_ok_and(|f| f.is_finite())
        || matches!(value, "true" | "false");
    if bare {
        value.to_owned()
    } else {
        toml::Value::String(value.to_owned()).to_string()
    }
}

/// A complete, commented configuration file for `role`.
pub(crate) fn example(role: &str) -> anyhow::Result<String> {
    let cmd = command();
    let sub = cmd
        .find_subcommand(role)
        .with_context(|| format!("no role {role:?}"))?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# shardseal {role} configuration: `shardseal {role} --config FILE`.\n\
         # Keys are the long flag names of `shardseal {role} --help`. Precedence:\n\
         # command-line flag > environment variable (named on each setting) > this file > default.\n\
         # Commented-out settings have no default."
    );
    for arg in settable(sub) {
        let Some(long) = arg.get_long() else { continue };
        if arg.is_hide_set() {
            continue;
        }
        let key = long.replace('-', "_");
        out.push('\n');
        if let Some(help) = arg.get_long_help().or_else(|| arg.get_help()) {
            for line in textwrap(&help.to_string(), 88) {
                let _ = writeln!(out, "# {line}");
            }
        }
        if let Some(env) = env_name(role, arg) {
            let _ = writeln!(out, "# environment: {env}");
        }
        let defaults: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        let many = takes_many_values(arg) || matches!(arg.get_action(), ArgAction::Append);
        if is_flag(arg) {
            let _ = writeln!(out, "{key} = false");
        } else if let [default] = defaults.as_slice() {
            let _ = writeln!(out, "{key} = {}", literal(default));
        } else if let Some(value) = example_value(role, long) {
            let _ = writeln!(out, "{key} = {}", literal(value));
        } else {
            let placeholder = arg
                .get_value_names()
                .and_then(|n| n.first())
                .map_or_else(|| long.to_ascii_uppercase(), |n| n.to_string());
            let placeholder = toml::Value::String(placeholder).to_string();
            if many {
                let _ = writeln!(out, "# {key} = [{placeholder}]");
            } else {
                let _ = writeln!(out, "# {key} = {placeholder}");
            }
        }
    }
    if role == "broker" {
        let defaults = shardseal_keys::broker::BrokerConfig::default();
        let _ = writeln!(
            out,
            "\n# Key broker tunables (the broker's own settings; defaults shown).\n\
             # trusted_roots.software_tee and owner_keys may also be listed here, as hex.\n\
             nonce_lifetime_ms = {}\nmax_outstanding_nonces = {}\ntoken_lifetime_ms = {}\n\
             owner_auth_window_ms = {}\nmax_concurrent_attestations = {}\nrequest_timeout_ms = {}",
            defaults.nonce_lifetime_ms,
            defaults.max_outstanding_nonces,
            defaults.token_lifetime_ms,
            defaults.owner_auth_window_ms,
            defaults.max_concurrent_attestations,
            defaults.request_timeout_ms,
        );
    }
    Ok(out)
}

/// Splits `text` into lines of at most `width` characters, on spaces.
fn textwrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    for paragraph in text.lines() {
        let mut line = String::new();
        for word in paragraph.split_whitespace() {
            if !line.is_empty() && line.len() + 1 + word.len() > width {
                lines.push(std::mem::take(&mut line));
            }
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(word);
        }
        lines.push(line);
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(items: &[&str]) -> Vec<OsString> {
        items.iter().map(OsString::from).collect()
    }

    fn strings(argv: &[OsString]) -> Vec<String> {
        argv.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn file_settings_become_flags_the_command_line_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "broker = \"https://b:1\"\npki = \"p\"\nmax_replicas = 7\nmin-replicas = 1\n\
             deploy = [\"a=2\", \"b=1\"]\nmetrics_allow_remote = false\n\
             function_command = [\"prog\", \"x\"]\n",
        )
        .unwrap();
        let out = expand(
            &command(),
            argv(&[
                "shardseal",
                "coordinator",
                "--config",
                file.to_str().unwrap(),
                "--min-replicas",
                "2",
            ]),
        )
        .unwrap();
        let out = strings(&out);
        let joined = out.join(" ");
        assert!(joined.contains("--max-replicas 7"), "{joined}");
        assert!(joined.contains("--deploy a=2 --deploy b=1"), "{joined}");
        assert!(joined.ends_with("--function-command prog x"), "{joined}");
        // The command line's --min-replicas wins over the file's.
        assert_eq!(out.iter().filter(|a| *a == "--min-replicas").count(), 1);
        assert!(joined.contains("--min-replicas 2"), "{joined}");
        assert!(!joined.contains("--metrics-allow-remote"), "{joined}");
        let matches = command().try_get_matches_from(&out).unwrap();
        crate::Cli::from_arg_matches(&matches).unwrap();
    }

    #[test]
    fn unknown_and_bad_fields_name_the_file_and_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "max_replica = 7\n").unwrap();
        let run = |file: &Path| {
            expand(
                &command(),
                argv(&[
                    "shardseal",
                    "coordinator",
                    "--config",
                    file.to_str().unwrap(),
                ]),
            )
            .unwrap_err()
            .to_string()
        };
        let error = run(&file);
        assert!(
            error.starts_with(&format!(
                "{}: unknown field `max_replica` for shardseal coordinator (known fields: ",
                file.display()
            )),
            "{error}"
        );
        std::fs::write(&file, "max_replicas = \"many\"\n").unwrap();
        let error = run(&file);
        assert!(
            error.starts_with(&format!("{}: field `max_replicas`: ", file.display())),
            "{error}"
        );
        assert!(error.contains("many"), "{error}");
        std::fs::write(&file, "scale_window = \"10 parsecs\"\n").unwrap();
        let error = run(&file);
        assert!(error.contains("field `scale_window`"), "{error}");
        std::fs::write(&file, "max_replicas = [").unwrap();
        assert!(run(&file).contains("not valid TOML"));
    }

    #[test]
    fn commands_that_are_not_roles_are_left_alone() {
        let input = argv(&["shardseal", "plan", "m.onnx", "--stages", "2"]);
        assert_eq!(expand(&command(), input.clone()).unwrap(), input);
    }

    #[test]
    fn every_example_is_accepted_by_its_role() {
        for role in ROLES {
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("example.toml");
            std::fs::write(&file, example(role).unwrap()).unwrap();
            let out = expand(
                &command(),
                argv(&["shardseal", role, "--config", file.to_str().unwrap()]),
            )
            .unwrap_or_else(|e| panic!("{role}: {e}"));
            let matches = command()
                .try_get_matches_from(&out)
                .unwrap_or_else(|e| panic!("{role}: {e}"));
            crate::Cli::from_arg_matches(&matches).unwrap_or_else(|e| panic!("{role}: {e}"));
            if *role == "broker" {
                broker_file_config(&file).unwrap();
            }
        }
    }
}
