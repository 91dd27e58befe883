//! The process's database: SQLite in dev mode, Postgres in production. Queries are written once
//! (`$n` placeholders work in both) and run on whichever pool is configured.

use sqlx::{PgPool, SqlitePool};

/// A database pool of either kind.
#[derive(Clone)]
pub enum Db {
    /// Dev mode.
    Sqlite(SqlitePool),
    /// Production.
    Postgres(PgPool),
}

/// Runs `$body` with `$pool` bound to the pool, whichever kind it is.
#[macro_export]
macro_rules! on_pool {
    ($db:expr, $pool:ident => $body:expr) => {
        match $db {
            $crate::db::Db::Sqlite($pool) => $body,
            $crate::db::Db::Postgres($pool) => $body,
        }
    };
}
