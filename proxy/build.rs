//! Rebuild when a migration file is added or changed: `sqlx::migrate!` in
//! `src/config/db.rs` embeds `migrations/<kind>/*.sql` at build time, and
//! without this cargo would not notice a new file.

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
