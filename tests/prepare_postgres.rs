//! `scripts/prepare-postgres` on the real Postgres of the dev stack: it makes a table ready for
//! Debezium (role, grants, publication, replica identity), reports each change, changes nothing
//! the second time, and the role it made can open a logical replication connection.

mod common;

use std::process::Command;

use common::*;

fn prepare(args: &[&str]) -> (i32, String, String) {
    let port = std::env::var("PAYSTREAM_PG_PORT").unwrap_or_else(|_| "25432".into());
    output(
        Command::new(root().join("scripts/prepare-postgres"))
            .args(args)
            .envs([
                ("PGHOST", "127.0.0.1"),
                ("PGPORT", port.as_str()),
                ("PGUSER", "postgres"),
                ("PGDATABASE", "payments"),
                ("DEBEZIUM_PASSWORD", "dbz-secret"),
            ]),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepares_a_table_for_debezium_once_and_reports_it() {
    let s = stack();
    let run = unique("prep");
    let db = pg(&s.pg_url).await;
    let table = format!("public.{run}");
    db.batch_execute(&format!(
        "CREATE TABLE {table} (id bigint PRIMARY KEY, status text NOT NULL DEFAULT 'pending')"
    ))
    .await
    .unwrap();
    let (role, publication) = (format!("{run}_dbz"), format!("{run}_pub"));
    let args = [
        "--role",
        role.as_str(),
        "--table",
        table.as_str(),
        "--publication",
        publication.as_str(),
        "--replica-identity",
        "full",
    ];

    let (code, out, err) = prepare(&args);
    assert_eq!(code, 0, "{out}{err}");
    for change in [
        format!("created role {role}"),
        format!("granted USAGE on schema public and SELECT on {table}"),
        format!("created publication {publication} for {table}"),
        format!("set REPLICA IDENTITY FULL on {table}"),
    ] {
        assert!(out.contains(&change), "missing {change:?} in:\n{out}");
    }
    assert!(out.contains("4 change(s) made"), "{out}");

    // What Postgres now says.
    let row = db
        .query_one(
            "SELECT r.rolreplication AND r.rolcanlogin,
                    has_table_privilege($1, $2, 'SELECT'),
                    EXISTS (SELECT 1 FROM pg_publication_tables WHERE pubname = $3 AND tablename = $4),
                    (SELECT relreplident FROM pg_class WHERE oid = $2::regclass)::text
             FROM pg_roles r WHERE r.rolname = $1",
            &[&role, &table, &publication, &run],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0), "LOGIN REPLICATION");
    assert!(row.get::<_, bool>(1), "SELECT granted");
    assert!(row.get::<_, bool>(2), "table in the publication");
    assert_eq!(row.get::<_, String>(3), "f", "REPLICA IDENTITY FULL");

    // Idempotent: the second run changes nothing and says so.
    let (code, out, _) = prepare(&args);
    assert_eq!(code, 0);
    assert!(out.contains("nothing to change"), "{out}");
    assert!(!out.contains("changed:"), "{out}");

    // Back to the primary key as identity: reported as the one change.
    let mut default_args = args.to_vec();
    default_args[7] = "default";
    let (code, out, _) = prepare(&default_args);
    assert_eq!(code, 0);
    assert!(
        out.contains(&format!("set REPLICA IDENTITY DEFAULT on {table}")),
        "{out}"
    );
    assert!(out.contains("1 change(s) made"), "{out}");

    // The role can open a logical replication connection (what Debezium does first).
    let port = std::env::var("PAYSTREAM_PG_PORT").unwrap_or_else(|_| "25432".into());
    let ident = Command::new("psql")
        .args([
            &format!("host=127.0.0.1 port={port} user={role} dbname=payments replication=database"),
            "-Atc",
            "IDENTIFY_SYSTEM",
        ])
        .env("PGPASSWORD", "dbz-secret")
        .output()
        .unwrap();
    assert!(
        ident.status.success(),
        "{}",
        String::from_utf8_lossy(&ident.stderr)
    );

    // Bad input is refused before any SQL runs.
    let (code, _, err) = prepare(&["--table", "payments; DROP TABLE x"]);
    assert_eq!(code, 1);
    assert!(err.contains("identifiers"), "{err}");

    db.batch_execute(&format!(
        "DROP PUBLICATION {publication}; DROP TABLE {table}; DROP OWNED BY {role}; DROP ROLE {role}"
    ))
    .await
    .unwrap();
}
