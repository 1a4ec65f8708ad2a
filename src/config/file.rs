//! The optional `--config FILE` (TOML): each key exported as its environment variable, so clap
//! parses and checks it like every other source.

// The defaults, parsers and error constructor of `config`, shared by every command.
use super::*;

/// Applies a TOML config file: each key becomes its `PAYSTREAM_*` (or declared) environment
/// variable unless that is already set. Keys must be flag names of `command` (`poll-interval`
/// or `poll_interval`); anything else is an error naming the key.
pub fn apply_config_file<C: CommandFactory>(
    path: &std::path::Path,
    subcommand: &str,
) -> Result<(), ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| bad("--config", format!("{}: {e}", path.display())))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e| bad("--config", format!("{}: {e}", path.display())))?;
    let cmd = C::command();
    let sub = cmd
        .find_subcommand(subcommand)
        .ok_or_else(|| bad("--config", format!("no command {subcommand}")))?;
    for (key, value) in table {
        let flag = key.replace('_', "-");
        let arg = sub
            .get_arguments()
            .find(|a| a.get_long() == Some(flag.as_str()))
            .ok_or_else(|| {
                bad(
                    "--config",
                    format!(
                        "{}: unknown key {key:?} for `paystream {subcommand}`",
                        path.display()
                    ),
                )
            })?;
        let env = arg
            .get_env()
            .and_then(|e| e.to_str())
            .ok_or_else(|| {
                bad(
                    "--config",
                    format!("{}: key {key:?} cannot be set from a file", path.display()),
                )
            })?
            .to_string();
        let text = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            toml::Value::Array(a) => a
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| v.to_string())
                })
                .collect::<Vec<_>>()
                .join(";"),
            other => {
                return Err(bad(
                    "--config",
                    format!(
                        "{}: key {key:?} has unsupported value {other}",
                        path.display()
                    ),
                ))
            }
        };
        if std::env::var_os(&env).is_none() {
            std::env::set_var(env, text);
        }
    }
    Ok(())
}
