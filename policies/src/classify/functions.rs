//! Functions whose call is itself a write, or worse.

/// Functions that change data or server state, act outside the database or
/// the session, or run or read SQL given as text (so the classifier cannot
/// see what they touch). Calling any of them makes a statement `writes`,
/// whatever its kind: `SELECT nextval('s')` is a select that writes.
///
/// A name ending in `*` matches every function whose name starts with the
/// rest (`dblink*` matches `dblink_exec`). Names are compared after the
/// classifier has lowercased them and dropped the schema
/// (`pg_catalog.set_config` is `set_config`).
///
/// This is a list of what ships with PostgreSQL and its common extensions
/// (contrib `dblink`, `adminpack`, `lo`); user-defined functions can do
/// anything and are for policies to name.
pub(crate) const SIDE_EFFECT_FUNCTIONS: &[&str] = &[
    // Sequences.
    "nextval",
    "setval",
    // Settings (and through them the role, read-only mode, parsing).
    "set_config",
    // Large objects: server files and pg_largeobject.
    "lo_*",
    "lowrite",
    // Other databases and servers.
    "dblink*",
    // Server files and directories (and contrib adminpack).
    "pg_read_file",
    "pg_read_binary_file",
    "pg_stat_file",
    "pg_ls_*",
    "pg_file_*",
    "pg_logdir_ls",
    // Other sessions and the server itself.
    "pg_terminate_backend",
    "pg_cancel_backend",
    "pg_reload_conf",
    "pg_rotate_logfile",
    "pg_log_backend_memory_contexts",
    "pg_promote",
    "pg_wal_replay_pause",
    "pg_wal_replay_resume",
    // WAL, backups, replication.
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
    "pg_logical_slot_get_changes",
    "pg_logical_slot_get_binary_changes",
    "pg_logical_emit_message",
    "pg_replication_origin_*",
    "pg_sync_replication_slots",
    "pg_log_standby_snapshot",
    // Statistics and collations.
    "pg_stat_reset*",
    "pg_stat_statements_reset",
    "pg_import_system_collations",
    // Locks that outlive the statement, and messages to other sessions.
    "pg_advisory_*",
    "pg_try_advisory_*",
    "pg_notify",
    // Run SQL text, or read a table or schema named in text.
    "query_to_xml",
    "query_to_xmlschema",
    "query_to_xml_and_xmlschema",
    "table_to_xml*",
    "schema_to_xml*",
    "database_to_xml*",
    "ts_stat",
    // pg_upgrade internals, superuser only.
    "binary_upgrade_*",
];

/// Whether calling `name` (lowercased, without schema) has a side effect,
/// by [`SIDE_EFFECT_FUNCTIONS`].
pub(crate) fn has_side_effect(name: &str) -> bool {
    SIDE_EFFECT_FUNCTIONS
        .iter()
        .any(|pattern| match pattern.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => name == *pattern,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_and_prefix_patterns() {
        assert!(has_side_effect("nextval"));
        assert!(has_side_effect("dblink_exec"));
        assert!(has_side_effect("lo_import"));
        assert!(has_side_effect("pg_advisory_xact_lock_shared"));
        assert!(!has_side_effect("nextvalue"));
        assert!(!has_side_effect("currval"));
        assert!(!has_side_effect("count"));
        assert!(!has_side_effect("pg_table_is_visible"));
    }
}
