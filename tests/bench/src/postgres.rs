//! The PostgreSQL server the `postgres` and `cluster` rows run on: the one
//! `TRELLIS_BENCH_POSTGRES` (else `TRELLIS_TEST_POSTGRES`) names, a fresh
//! schema per use.

use anyhow::Context as _;

/// The server's URL, if one is named.
pub fn server_url() -> Option<String> {
    ["TRELLIS_BENCH_POSTGRES", "TRELLIS_TEST_POSTGRES"]
        .iter()
        .find_map(|name| std::env::var(name).ok().filter(|url| !url.is_empty()))
}

/// Makes a fresh schema on the server at `url`; the store URL of a service
/// on it, its sessions set up with `settings` too (`name=value` each).
pub async fn fresh_schema(url: &str, settings: &[&str]) -> anyhow::Result<String> {
    let schema = format!("trellis_bench_{}", uuid::Uuid::now_v7().simple());
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("cannot connect to the benchmark's PostgreSQL {url}"))?;
    tokio::spawn(connection);
    client
        .batch_execute(&format!("CREATE SCHEMA {schema}"))
        .await?;
    // Every load starts from a fresh checkpoint, so that none pays for the
    // one the load before it made due (the server's own figure would move
    // with whatever came before). Needs a superuser or `pg_checkpoint`;
    // without, the loads just share the server's schedule.
    if let Err(err) = client.batch_execute("CHECKPOINT").await {
        eprintln!("postgres: no CHECKPOINT before the load ({err}); figures may vary more");
    }
    let options = std::iter::once(format!("search_path={schema}"))
        .chain(settings.iter().map(|setting| setting.to_string()))
        .map(|setting| format!("-c%20{}", setting.replace('=', "%3D")))
        .collect::<Vec<_>>()
        .join("%20");
    let separator = if url.contains('?') { '&' } else { '?' };
    Ok(format!("{url}{separator}options={options}"))
}
