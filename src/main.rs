//! The `paystream` binary: parses the CLI, sets up logging, runs a command. `anyhow` lives only
//! here, at the edge; everything below returns typed errors.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use paystream::config::{apply_config_file, DecodeArgs, RunConfig, UpdaterConfig};

#[derive(Parser)]
#[command(
    name = "paystream",
    version,
    about = "Watches pending payments from Debezium CDC, polls Stripe, emits final status events"
)]
struct Cli {
    /// Optional TOML file; its keys are the long flag names (poll-interval = "10m").
    #[arg(long, global = true, env = "PAYSTREAM_CONFIG")]
    config: Option<PathBuf>,
    /// Log format.
    #[arg(
        long,
        global = true,
        env = "PAYSTREAM_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// The daemon: CDC in, Stripe polls, status events out.
    Run(RunConfig),
    /// Writes status events back to the Postgres master, forward only.
    Updater(UpdaterConfig),
    /// Inspects the state store: through the running daemon if one serves --data-dir, else
    /// directly. Reads the same flags, environment and config file as `run`.
    State(paystream::admin::cli::StateArgs),
    /// Feeds files of Debezium message values (one per line) through the daemon's
    /// decode → state → checkpoint path, then prints one JSON summary line. Resumable.
    Replay(paystream::replay::ReplayArgs),
    /// Writes a file of realistic Debezium events (for replay and the benchmarks) and prints
    /// what it holds as one JSON line on stderr.
    GenEvents {
        #[command(flatten)]
        spec: paystream::replay::generate::GenSpec,
        /// Output file, or - for standard output.
        #[arg(long, default_value = "-")]
        out: String,
    },
    /// Decodes Kafka message values and prints one normalized JSON object per input: JSON one per
    /// line (an empty line or `null` is a tombstone), Confluent Avro as hex per line or as a
    /// binary file of one message (with --schema-registry-url).
    Decode {
        #[command(flatten)]
        decode: DecodeArgs,
        /// Input file, or - for standard input.
        #[arg(default_value = "-")]
        input: String,
    },
}

/// async-stripe logs every failed request at WARN; paystream logs and counts each poll outcome
/// itself (with the payment's ids), so the client's own lines are kept to errors. The cron
/// scheduler's start-up chatter likewise.
const DEFAULT_LOG_FILTER: &str = "info,stripe=error,tokio_cron_scheduler=warn";

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| DEFAULT_LOG_FILTER.into());
    // Colour only on a terminal: escape codes in a log file or a pipe (`paystream state …
    // 2>err.txt`, a container's log) are noise to every reader and grep.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

/// The config file is applied before clap parses, as environment defaults (see `config`).
fn preload_config_file() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let path = args
        .iter()
        .position(|a| a == "--config")
        .and_then(|i| args.get(i + 1).cloned())
        .or_else(|| {
            args.iter()
                .find_map(|a| a.strip_prefix("--config=").map(str::to_string))
        })
        .or_else(|| std::env::var("PAYSTREAM_CONFIG").ok());
    let sub = args.iter().skip(1).find(|a| {
        matches!(
            a.as_str(),
            "run" | "updater" | "decode" | "state" | "replay"
        )
    });
    if let (Some(path), Some(sub)) = (path, sub) {
        // `state` inspects and `replay` fills what `run` configured: both read the daemon's
        // file, checked as such.
        let sub = if matches!(sub.as_str(), "state" | "replay") {
            "run"
        } else {
            sub
        };
        apply_config_file::<Cli>(std::path::Path::new(&path), sub)?;
    }
    Ok(())
}

fn shutdown_signal() -> tokio::sync::watch::Receiver<bool> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        }
        let _ = tx.send(true);
    });
    rx
}

/// One input of `paystream decode`: a message value (`None`: a tombstone).
fn decode_inputs(args: &DecodeArgs, input: &str) -> anyhow::Result<Vec<Option<Vec<u8>>>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    if input == "-" {
        std::io::stdin().lock().read_to_end(&mut bytes)?;
    } else {
        std::fs::File::open(input)
            .with_context(|| format!("opening {input}"))?
            .read_to_end(&mut bytes)?;
    }
    let avro_ok = args.format != paystream::decode::Format::Json;
    // A binary file holding one Confluent Avro message (no JSON text starts with 0x00).
    if avro_ok && bytes.first() == Some(&0) {
        return Ok(vec![Some(bytes)]);
    }
    let text = String::from_utf8(bytes)
        .context("input is neither UTF-8 lines nor one binary Avro message")?;
    Ok(text
        .lines()
        .map(|line| match line.trim() {
            "" | "null" => None,
            // Avro as hex per line: the wire format's 0x00 magic byte shows as a leading "00".
            t if avro_ok
                && t.starts_with("00")
                && t.len() % 2 == 0
                && t.bytes().all(|b| b.is_ascii_hexdigit()) =>
            {
                Some(
                    (0..t.len())
                        .step_by(2)
                        .map(|i| u8::from_str_radix(&t[i..i + 2], 16).expect("hex digits"))
                        .collect(),
                )
            }
            _ => Some(line.as_bytes().to_vec()),
        })
        .collect())
}

fn decode_lines(args: &DecodeArgs, input: &str) -> anyhow::Result<bool> {
    args.validate()?;
    let decoder = paystream::decode::Decoder::new(args.decoder_settings());
    let inputs = decode_inputs(args, input)?;
    let rt = tokio::runtime::Runtime::new()?;
    let mut out = std::io::stdout().lock();
    let mut ok = true;
    for (i, value) in inputs.iter().enumerate() {
        let json = match rt.block_on(decoder.value(value.as_deref())) {
            Ok(ev) => serde_json::to_string(&ev)?,
            Err(e) => {
                ok = false;
                serde_json::json!({"line": i + 1, "error": e.to_string()}).to_string()
            }
        };
        writeln!(out, "{json}")?;
    }
    Ok(ok)
}

/// Errors end the process with one line (`Error: …`, causes joined by `: `) and exit code 1,
/// whatever RUST_BACKTRACE says: the line is for the operator, not a stack trace.
fn main() {
    if let Err(e) = real_main() {
        eprintln!("Error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> anyhow::Result<()> {
    if std::env::var_os("STRIPE_SECRET_KEY").is_none() {
        if let Some(k) = std::env::var_os("PAYSTREAM_STRIPE_KEY") {
            std::env::set_var("STRIPE_SECRET_KEY", k);
        }
    }
    preload_config_file()?;
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Decode { decode, input } => {
            if !decode_lines(&decode, &input)? {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Run(cfg) => {
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(async { paystream::run::run(cfg, shutdown_signal()).await })?;
            Ok(())
        }
        Command::State(args) => {
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(paystream::admin::cli::run(args))?;
            Ok(())
        }
        Command::Replay(args) => {
            let rt = tokio::runtime::Runtime::new()?;
            let sum =
                rt.block_on(async { paystream::replay::replay(args, shutdown_signal()).await })?;
            println!("{}", serde_json::to_string(&sum)?);
            Ok(())
        }
        Command::GenEvents { spec, out } => {
            let sum = if out == "-" {
                let mut w = std::io::BufWriter::new(std::io::stdout().lock());
                paystream::replay::generate::generate(&spec, &mut w)?
            } else {
                let f = std::fs::File::create(&out).with_context(|| format!("creating {out}"))?;
                let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
                paystream::replay::generate::generate(&spec, &mut w)?
            };
            eprintln!("{}", serde_json::to_string(&sum)?);
            Ok(())
        }
        Command::Updater(cfg) => {
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(async { paystream::updater::run(cfg, shutdown_signal()).await })?;
            Ok(())
        }
    }
}
