//! `shardseal usage`: what the served traffic cost, pay-per-use, against an always-on
//! server of the same memory.

use std::path::PathBuf;

use anyhow::Context;
use shardseal_coordinator::billing::{Prices, Usage, UsageLog, UsageReport};

use crate::stack::Layout;

/// Report GB-seconds and invocations per model, stage and request, and their cost.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  shardseal usage --state state\n  shardseal usage --log state/coordinator/usage.jsonl --by-request --json\n\n\
Defaults are list prices of late 2024: $0.0000166667 per GB-second and $0.20 per million\n\
invocations (AWS Lambda, x86); an always-on server's memory at $0.0126 per GB-hour\n\
(an m7i.large: $0.1008 an hour for 8 GB). The always-on server holds one replica of every\n\
stage seen, for the period the log covers (or --period-hours)."
)]
pub(crate) struct UsageArgs {
    /// The state folder of `shardseal up` (reads STATE/coordinator/usage.jsonl).
    #[arg(long, default_value = "shardseal-state", conflicts_with = "log")]
    state: PathBuf,
    /// A usage log written by `shardseal coordinator --usage-log`.
    #[arg(long)]
    log: Option<PathBuf>,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    json: bool,
    /// Also list every request.
    #[arg(long)]
    by_request: bool,
    /// The period the always-on server is paid for, in hours (default: the log's span).
    #[arg(long)]
    period_hours: Option<f64>,
    /// Price of a GB-second of function time.
    #[arg(long, default_value_t = Prices::default().gb_second)]
    price_gb_second: f64,
    /// Price of a million invocations.
    #[arg(long, default_value_t = Prices::default().per_million_invocations)]
    price_per_million: f64,
    /// Price of a GB-hour of an always-on server.
    #[arg(long, default_value_t = Prices::default().server_gb_hour)]
    server_gb_hour: f64,
}

pub(crate) fn run(args: UsageArgs) -> anyhow::Result<()> {
    let path = args
        .log
        .clone()
        .unwrap_or_else(|| Layout::new(&args.state).usage_log());
    let (records, torn) = UsageLog::read(&path)
        .with_context(|| format!("reading the usage log {}", path.display()))?;
    for (name, value) in [
        ("--price-gb-second", args.price_gb_second),
        ("--price-per-million", args.price_per_million),
        ("--server-gb-hour", args.server_gb_hour),
        ("--period-hours", args.period_hours.unwrap_or(0.0)),
    ] {
        anyhow::ensure!(
            value.is_finite() && value >= 0.0,
            "{name} must be a non-negative number"
        );
    }
    let prices = Prices {
        gb_second: args.price_gb_second,
        per_million_invocations: args.price_per_million,
        server_gb_hour: args.server_gb_hour,
    };
    let report = UsageReport::new(&records, prices, args.period_hours, torn);
    if args.json {
        let mut value = serde_json::to_value(&report)?;
        if !args.by_request
            && let Some(object) = value.as_object_mut()
        {
            object.remove("by_request");
        }
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        print_tables(&report, args.by_request);
    }
    Ok(())
}

fn print_tables(report: &UsageReport, by_request: bool) {
    let row = |name: &str, u: &Usage| {
        println!("{name:<40} {:>12} {:>14.4}", u.invocations, u.gb_seconds);
    };
    println!("{:<40} {:>12} {:>14}", "model", "invocations", "GB-seconds");
    for (model, usage) in &report.models {
        row(model, usage);
    }
    println!();
    println!(
        "{:<40} {:>12} {:>14}",
        "model/stage", "invocations", "GB-seconds"
    );
    for (stage, usage) in &report.stages {
        row(stage, usage);
    }
    if by_request {
        println!();
        println!(
            "{:<40} {:>12} {:>14}",
            "request", "invocations", "GB-seconds"
        );
        for (request, usage) in &report.by_request {
            row(request, usage);
        }
    }
    println!();
    row("total", &report.total);
    println!("requests: {}", report.requests);
    println!(
        "pay-per-use: ${:.6}   always-on server ({:.2} GB for {:.3} h): ${:.6}",
        report.serverless_cost, report.server_memory_gb, report.period_hours, report.always_on_cost
    );
    if report.torn_records > 0 {
        println!(
            "note: {} record(s) cut short by a crash were skipped",
            report.torn_records
        );
    }
}
