//! What paystream's Postgres code shares: quoting identifiers, and connecting with an
//! `application_name` that says which part of paystream holds the connection
//! (`paystream-updater`, `paystream-embedded`), so a DBA can tell paystream's writes and slots
//! apart in `pg_stat_activity` and in audit triggers (`current_setting('application_name')`).
//! A URL that sets its own `application_name` keeps it.

/// `[schema.]name` as a quoted SQL identifier (an embedded `"` doubled).
pub fn quote_ident(s: &str) -> String {
    s.split('.')
        .map(|p| format!("\"{}\"", p.replace('"', "\"\"")))
        .collect::<Vec<_>>()
        .join(".")
}

/// The connection settings of `url` with `application_name` set to `name` unless the URL
/// names one itself.
pub fn config(url: &str, name: &str) -> Result<tokio_postgres::Config, tokio_postgres::Error> {
    let mut c: tokio_postgres::Config = url.parse()?;
    if c.get_application_name().is_none() {
        c.application_name(name);
    }
    Ok(c)
}

/// Connects (no TLS) as `name`; the connection's task is the caller's to spawn.
pub async fn connect(
    url: &str,
    name: &str,
) -> Result<
    (
        tokio_postgres::Client,
        tokio_postgres::Connection<tokio_postgres::Socket, tokio_postgres::tls::NoTlsStream>,
    ),
    tokio_postgres::Error,
> {
    config(url, name)?.connect(tokio_postgres::NoTls).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn application_name_is_set_unless_the_url_names_one() {
        let c = config("host=127.0.0.1 user=postgres", "paystream-updater").unwrap();
        assert_eq!(c.get_application_name(), Some("paystream-updater"));
        let c = config(
            "postgres://u@h/db?application_name=mine",
            "paystream-updater",
        )
        .unwrap();
        assert_eq!(c.get_application_name(), Some("mine"));
        assert_eq!(quote_ident("public.pay\"s"), "\"public\".\"pay\"\"s\"");
    }
}
