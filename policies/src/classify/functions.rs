//! What calling a function does, for the functions that ship with
//! PostgreSQL (and contrib `dblink`, `adminpack`).
//!
//! The lists are checked against the catalogue: `tests/catalogue.rs` reads
//! `pg_proc` of a running PostgreSQL and fails when a volatile function of
//! `pg_catalog` is in none of them, so a new server version's functions
//! are classified on purpose, never by default. User-defined functions can
//! do anything; policies name them.

/// The effect of calling a function, least to most consequential.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Call {
    /// Reads, or changes nothing anyone else can see (`random`,
    /// `clock_timestamp`, `pg_sleep`, size and status functions).
    Harmless,
    /// Changes data or state inside the database (`nextval`, `set_config`,
    /// large objects, advisory locks, `pg_notify`, index maintenance).
    Writes,
    /// Reaches outside the database or into other sessions, or administers
    /// the server (files, signals, WAL, replication, statistics resets).
    Outside,
    /// Runs SQL given as text, or reads tables named in text: what it
    /// touches cannot be known from the statement.
    Dynamic,
}

/// Patterns by effect. A name ending in `*` matches every function whose
/// name starts with the rest. Names are lowercase, without schema. When
/// several match, the most consequential effect stands
/// (`lo_import` is `Outside` although `lo_*` is `Writes`).
const CATALOGUE: &[(Call, &[&str])] = &[
    (
        Call::Dynamic,
        &[
            // SQL text run by the server.
            "query_to_xml",
            "query_to_xmlschema",
            "query_to_xml_and_xmlschema",
            "cursor_to_xml",
            "cursor_to_xmlschema",
            "ts_stat",
            "ts_rewrite",
            // Tables, schemas, databases named in text.
            "table_to_xml*",
            "schema_to_xml*",
            "database_to_xml*",
            // Other databases and servers (contrib dblink).
            "dblink*",
            // Language handlers (a DO block's body, a procedure's).
            "plpgsql_inline_handler",
            "plpgsql_call_handler",
        ],
    ),
    (
        Call::Outside,
        &[
            // Server files and directories (and contrib adminpack).
            "pg_read_file",
            "pg_read_file_old",
            "pg_read_binary_file",
            "pg_stat_file",
            "pg_ls_*",
            "pg_file_*",
            "pg_logdir_ls",
            "lo_import",
            "lo_export",
            "pg_hba_file_rules",
            "pg_ident_file_mappings",
            "pg_show_all_file_settings",
            // Other sessions and the server itself.
            "pg_terminate_backend",
            "pg_cancel_backend",
            "pg_reload_conf",
            "pg_rotate_logfile",
            "pg_rotate_logfile_old",
            "pg_log_backend_memory_contexts",
            "pg_promote",
            // WAL, backups, replication, logical decoding.
            "pg_wal_replay_pause",
            "pg_wal_replay_resume",
            "pg_switch_wal",
            "pg_switch_xlog",
            "pg_create_restore_point",
            "pg_start_backup",
            "pg_stop_backup",
            "pg_backup_start",
            "pg_backup_stop",
            "pg_create_physical_replication_slot",
            "pg_create_logical_replication_slot",
            "pg_copy_physical_replication_slot",
            "pg_copy_logical_replication_slot",
            "pg_drop_replication_slot",
            "pg_replication_slot_advance",
            "pg_logical_slot_*",
            "pg_logical_emit_message",
            "pg_replication_origin_*",
            "pg_sync_replication_slots",
            "pg_log_standby_snapshot",
            // Statistics of the whole server.
            "pg_stat_reset*",
            "pg_stat_statements_reset",
            "pg_restore_relation_stats",
            "pg_restore_attribute_stats",
            "pg_clear_relation_stats",
            "pg_clear_attribute_stats",
            // Catalogue internals, superuser only.
            "pg_import_system_collations",
            "pg_extension_config_dump",
            "pg_stop_making_pinned_objects",
            "pg_nextoid",
            "binary_upgrade_*",
        ],
    ),
    (
        Call::Writes,
        &[
            "nextval",
            "setval",
            // Settings (and through them the role, read-only mode, parsing).
            "set_config",
            // Large objects (pg_largeobject).
            "lo_*",
            "loread",
            "lowrite",
            // Locks that outlive the statement; messages to other sessions.
            "pg_advisory_*",
            "pg_try_advisory_*",
            "pg_notify",
            // Index maintenance.
            "brin_summarize_range",
            "brin_summarize_new_values",
            "brin_desummarize_range",
            "gin_clean_pending_list",
        ],
    ),
    (
        Call::Harmless,
        &[
            // Volatile only because their value changes from call to call.
            "random",
            "random_normal",
            "setseed",
            "gen_random_uuid",
            "uuidv4",
            "uuidv7",
            "clock_timestamp",
            "timeofday",
            "pg_sleep",
            "pg_sleep_for",
            "pg_sleep_until",
            "current_query",
            "currval",
            "lastval",
            "currtid2",
            "txid_status",
            "pg_xact_status",
            "pg_xact_commit_timestamp",
            "pg_xact_commit_timestamp_origin",
            "pg_last_committed_xact",
            "pg_export_snapshot",
            "pg_stat_clear_snapshot",
            "pg_stat_force_next_flush",
            "pg_stat_have_stats",
            "pg_stat_get_*",
            "pg_sequence_last_value",
            // Sizes, status and server state (read only).
            "pg_database_size",
            "pg_relation_size",
            "pg_table_size",
            "pg_indexes_size",
            "pg_total_relation_size",
            "pg_tablespace_size",
            "pg_partition_ancestors",
            "pg_partition_tree",
            "pg_blocking_pids",
            "pg_safe_snapshot_blocking_pids",
            "pg_isolation_test_session_is_blocked",
            "pg_lock_status",
            "pg_prepared_xact",
            "pg_notification_queue_usage",
            "pg_get_backend_memory_contexts",
            "pg_get_multixact_members",
            "pg_get_shmem_allocations",
            "pg_get_wal_replay_pause_state",
            "pg_get_wal_resource_managers",
            "pg_get_wait_events",
            "pg_get_loaded_modules",
            "pg_is_in_recovery",
            "pg_is_wal_replay_paused",
            "pg_jit_available",
            "pg_control_*",
            "pg_current_wal_*",
            "pg_last_wal_*",
            "pg_last_xact_replay_timestamp",
            "pg_current_logfile",
            "pg_show_replication_origin_status",
            "pg_collation_actual_version",
            "pg_database_collation_actual_version",
            // Access-method, table-sampling and text-search internals,
            // called by the server, not usefully by a statement.
            "amvalidate",
            "bernoulli",
            "system",
            "*handler",
            "dsnowball_init",
            "dsnowball_lexize",
            "plpgsql_validator",
        ],
    ),
];

fn matches(pattern: &str, name: &str) -> bool {
    if let Some(prefix) = pattern.strip_suffix('*') {
        name.starts_with(prefix)
    } else if let Some(suffix) = pattern.strip_prefix('*') {
        name.ends_with(suffix)
    } else {
        name == pattern
    }
}

/// What calling `name` (lowercase, without schema) does; `None` for a
/// function not in the catalogue lists (most of them: immutable and stable
/// functions that only compute, and user-defined ones).
pub(crate) fn call(name: &str) -> Option<Call> {
    CATALOGUE
        .iter()
        .filter(|(_, patterns)| patterns.iter().any(|p| matches(p, name)))
        .map(|(call, _)| *call)
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_most_consequential_match_stands() {
        assert_eq!(call("nextval"), Some(Call::Writes));
        assert_eq!(call("lo_unlink"), Some(Call::Writes));
        assert_eq!(call("lo_import"), Some(Call::Outside));
        assert_eq!(call("dblink_exec"), Some(Call::Dynamic));
        assert_eq!(call("query_to_xml"), Some(Call::Dynamic));
        // A language handler is Dynamic although `*handler` is Harmless.
        assert_eq!(call("plpgsql_inline_handler"), Some(Call::Dynamic));
        assert_eq!(call("heap_tableam_handler"), Some(Call::Harmless));
        assert_eq!(call("pg_advisory_xact_lock_shared"), Some(Call::Writes));
        assert_eq!(call("pg_stat_reset_shared"), Some(Call::Outside));
        assert_eq!(call("random"), Some(Call::Harmless));
        assert_eq!(call("nextvalue"), None);
        assert_eq!(call("count"), None);
    }

    /// The functions of the local PostgreSQL's `pg_catalog`, as psql lists
    /// them (one name a line) for a `WHERE` clause on `pg_proc`.
    fn catalogue(filter: &str) -> Vec<String> {
        let sql = format!(
            "SELECT DISTINCT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
             WHERE n.nspname = 'pg_catalog' AND ({filter}) ORDER BY 1"
        );
        let out = std::process::Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-AtX",
                "-c",
                &sql,
            ])
            .output()
            .expect("psql runs (deploy/scripts/test.sh installs it)");
        assert!(
            out.status.success(),
            "psql could not read pg_proc of the PostgreSQL on 127.0.0.1:5432: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let names: Vec<String> = String::from_utf8(out.stdout)
            .expect("names are UTF-8")
            .lines()
            .map(str::to_owned)
            .collect();
        assert!(!names.is_empty(), "pg_proc listed nothing for {filter}");
        names
    }

    /// Every volatile function of the server's catalogue is classified on
    /// purpose: a function a new PostgreSQL version adds fails this test
    /// until it is put in one of the lists. (Trigger functions cannot be
    /// called from a statement.)
    #[test]
    fn every_volatile_catalogue_function_is_classified() {
        let unknown: Vec<String> =
            catalogue("p.provolatile = 'v' AND p.prorettype <> 'trigger'::regtype")
                .into_iter()
                .filter(|name| call(name).is_none())
                .collect();
        assert!(
            unknown.is_empty(),
            "volatile pg_catalog functions missing from classify/functions.rs: {unknown:?}"
        );
    }

    /// Functions of a side-effect family are classified at least as that
    /// family, whatever their volatility.
    #[test]
    fn side_effect_families_are_known() {
        let families = [
            ("p.proname LIKE 'pg\\_read\\_%'", Call::Outside),
            ("p.proname LIKE 'pg\\_ls\\_%'", Call::Outside),
            (
                "p.proname ~ '^pg_(create|copy|drop)_.*replication_slot$'",
                Call::Outside,
            ),
            (
                "p.proname LIKE 'pg\\_replication\\_slot\\_%'",
                Call::Outside,
            ),
            ("p.proname LIKE 'pg\\_logical\\_%'", Call::Outside),
            ("p.proname LIKE 'pg\\_replication\\_origin%'", Call::Outside),
            ("p.proname LIKE 'pg\\_stat\\_reset%'", Call::Outside),
            ("p.proname LIKE 'pg\\_%backup%'", Call::Outside),
            ("p.proname LIKE 'pg\\_wal\\_replay%'", Call::Outside),
            (
                "p.proname LIKE 'pg\\_terminate%' OR p.proname LIKE 'pg\\_cancel%'",
                Call::Outside,
            ),
            ("p.proname LIKE 'lo\\_%'", Call::Writes),
            ("p.proname LIKE '%advisory%'", Call::Writes),
            ("p.proname LIKE '%\\_to\\_xml%'", Call::Dynamic),
        ];
        let mut wrong = Vec::new();
        for (filter, at_least) in families {
            for name in catalogue(filter) {
                if call(&name).is_none_or(|c| c < at_least) {
                    wrong.push(format!(
                        "{name} (want at least {at_least:?}, got {:?})",
                        call(&name)
                    ));
                }
            }
        }
        assert!(wrong.is_empty(), "{wrong:#?}");
    }
}
