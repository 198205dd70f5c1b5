//! Identity: domains > projects > users; role assignments; AK/SK keys; tokens.

use crate::db::{Db, RowExt};
use crate::error::{CoreError, Result};
use crate::ids::{is_hex_id, DomainId, ProjectId, UserId};
use crate::time::now_ms;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use rand::Rng;
use serde::Serialize;
use sha2::{Digest, Sha256};

/// Who is calling, and in which project. Every scoped operation takes one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Caller {
    pub user_id: UserId,
    pub user_name: String,
    pub domain_id: DomainId,
    pub project_id: ProjectId,
    pub project_name: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Domain {
    pub id: DomainId,
    pub name: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Project {
    pub id: ProjectId,
    pub name: String,
    pub domain_id: DomainId,
    pub domain_name: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct User {
    pub id: UserId,
    pub name: String,
    pub domain_id: DomainId,
}

/// An AK/SK key as stored.
#[derive(Debug, Clone, Serialize)]
pub struct AccessKey {
    pub access_key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_key: Option<String>,
    pub user_id: UserId,
    pub project_id: ProjectId,
}

/// The secret half of a key, with whom it acts for.
#[derive(Debug, Clone)]
pub struct KeyGrant {
    pub secret_key: String,
    pub caller: Caller,
}

/// A freshly issued token.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    pub token: String,
    pub issued_at: i64,
    pub expires_at: i64,
    pub caller: Caller,
}

fn random_string(len: usize, alphabet: &[u8]) -> String {
    let mut rng = rand::thread_rng();
    (0..len)
        .map(|_| alphabet[rng.gen_range(0..alphabet.len())] as char)
        .collect()
}

const UPPER_ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

/// A random password suitable for generated accounts.
pub fn random_password() -> String {
    random_string(24, ALNUM)
}

fn hash_password(pw: &str) -> Result<String> {
    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
    Argon2::default()
        .hash_password(pw.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| CoreError::Internal(format!("password hashing failed: {e}")))
}

fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

fn validate_entity_name(kind: &str, name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 64 {
        return Err(CoreError::InvalidRequest(format!(
            "{kind} name must be 1-64 characters"
        )));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(CoreError::InvalidRequest(format!(
            "{kind} name may contain only letters, digits, '-', '_' and '.'"
        )));
    }
    Ok(())
}

impl Db {
    pub async fn create_domain(&self, name: &str) -> Result<Domain> {
        validate_entity_name("domain", name)?;
        let id = DomainId::generate();
        sqlx::query("INSERT INTO domains (id, name, created_at) VALUES ($1, $2, $3)")
            .bind(id.as_str())
            .bind(name)
            .bind(now_ms())
            .execute(&self.pool)
            .await
            .map_err(|e| conflict_or(e, format!("domain {name} already exists")))?;
        Ok(Domain {
            id,
            name: name.into(),
        })
    }

    pub async fn list_domains(&self) -> Result<Vec<Domain>> {
        let rows = sqlx::query("SELECT id, name FROM domains ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .map(|r| Domain {
                id: DomainId(r.s("id")),
                name: r.s("name"),
            })
            .collect())
    }

    /// Finds a domain by id or name.
    pub async fn find_domain(&self, id_or_name: &str) -> Result<Domain> {
        let row = sqlx::query("SELECT id, name FROM domains WHERE id = $1 OR name = $1")
            .bind(id_or_name)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| CoreError::InvalidRequest(format!("no domain {id_or_name}")))?;
        Ok(Domain {
            id: DomainId(row.s("id")),
            name: row.s("name"),
        })
    }

    pub async fn create_project(&self, domain: &Domain, name: &str) -> Result<Project> {
        validate_entity_name("project", name)?;
        let id = ProjectId::generate();
        sqlx::query(
            "INSERT INTO projects (id, domain_id, name, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(id.as_str())
        .bind(domain.id.as_str())
        .bind(name)
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(|e| {
            conflict_or(
                e,
                format!("project {name} already exists in domain {}", domain.name),
            )
        })?;
        Ok(Project {
            id,
            name: name.into(),
            domain_id: domain.id.clone(),
            domain_name: domain.name.clone(),
        })
    }

    pub async fn list_projects(&self, domain: Option<&Domain>) -> Result<Vec<Project>> {
        let rows = sqlx::query(
            "SELECT p.id, p.name, p.domain_id, d.name AS domain_name FROM projects p \
             JOIN domains d ON d.id = p.domain_id ORDER BY d.name, p.name",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(project_from_row)
            .filter(|p| domain.is_none_or(|d| d.id == p.domain_id))
            .collect())
    }

    /// Finds a project by id (any domain) or by name within `domain` (default domain if None).
    pub async fn find_project(&self, id_or_name: &str, domain: Option<&Domain>) -> Result<Project> {
        let rows = sqlx::query(
            "SELECT p.id, p.name, p.domain_id, d.name AS domain_name FROM projects p \
             JOIN domains d ON d.id = p.domain_id WHERE p.id = $1 OR p.name = $1",
        )
        .bind(id_or_name)
        .fetch_all(&self.pool)
        .await?;
        let projects: Vec<Project> = rows.iter().map(project_from_row).collect();
        if let Some(p) = projects.iter().find(|p| p.id.as_str() == id_or_name) {
            return Ok(p.clone());
        }
        let wanted_domain = match domain {
            Some(d) => d.clone(),
            None => self.find_domain("default").await?,
        };
        projects
            .into_iter()
            .find(|p| p.domain_id == wanted_domain.id)
            .ok_or_else(|| CoreError::InvalidRequest(format!("no project {id_or_name}")))
    }

    pub async fn project_by_id(&self, id: &str) -> Result<Option<Project>> {
        let row = sqlx::query(
            "SELECT p.id, p.name, p.domain_id, d.name AS domain_name FROM projects p \
             JOIN domains d ON d.id = p.domain_id WHERE p.id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(project_from_row))
    }

    pub async fn delete_project(&self, project: &Project) -> Result<()> {
        let images: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM images WHERE owner = $1")
            .bind(project.id.as_str())
            .fetch_one(&self.pool)
            .await?;
        if images > 0 {
            return Err(CoreError::InvalidRequest(format!(
                "project {} still owns {images} image(s); delete them first",
                project.name
            )));
        }
        let mut tx = crate::db::begin_write(&self.pool).await?;
        for sql in [
            "DELETE FROM access_keys WHERE project_id = $1",
            "DELETE FROM tokens WHERE project_id = $1",
            "DELETE FROM role_assignments WHERE project_id = $1",
            "DELETE FROM projects WHERE id = $1",
        ] {
            sqlx::query(sql)
                .bind(project.id.as_str())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn create_user(
        &self,
        domain: &Domain,
        name: &str,
        password: Option<&str>,
    ) -> Result<User> {
        validate_entity_name("user", name)?;
        let id = UserId::generate();
        let hash = match password {
            Some(p) => Some(hash_password(p)?),
            None => None,
        };
        sqlx::query(
            "INSERT INTO users (id, domain_id, name, password_hash, created_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(id.as_str())
        .bind(domain.id.as_str())
        .bind(name)
        .bind(hash)
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(|e| conflict_or(e, format!("user {name} already exists in domain {}", domain.name)))?;
        Ok(User {
            id,
            name: name.into(),
            domain_id: domain.id.clone(),
        })
    }

    pub async fn find_user(&self, domain: &Domain, name_or_id: &str) -> Result<Option<User>> {
        let row = sqlx::query(
            "SELECT id, name, domain_id FROM users WHERE domain_id = $1 AND (name = $2 OR id = $2)",
        )
        .bind(domain.id.as_str())
        .bind(name_or_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| User {
            id: UserId(r.s("id")),
            name: r.s("name"),
            domain_id: DomainId(r.s("domain_id")),
        }))
    }

    pub async fn list_users(&self, domain: Option<&Domain>) -> Result<Vec<User>> {
        let rows = sqlx::query("SELECT id, name, domain_id FROM users ORDER BY domain_id, name")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .map(|r| User {
                id: UserId(r.s("id")),
                name: r.s("name"),
                domain_id: DomainId(r.s("domain_id")),
            })
            .filter(|u| domain.is_none_or(|d| d.id == u.domain_id))
            .collect())
    }

    pub async fn delete_user(&self, user: &User) -> Result<()> {
        let mut tx = crate::db::begin_write(&self.pool).await?;
        for sql in [
            "DELETE FROM access_keys WHERE user_id = $1",
            "DELETE FROM tokens WHERE user_id = $1",
            "DELETE FROM role_assignments WHERE user_id = $1",
            "DELETE FROM users WHERE id = $1",
        ] {
            sqlx::query(sql)
                .bind(user.id.as_str())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Lets `user` act in `project`.
    pub async fn grant_role(&self, user: &User, project: &Project, role: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO role_assignments (user_id, project_id, role) VALUES ($1, $2, $3) \
             ON CONFLICT (user_id, project_id) DO UPDATE SET role = excluded.role",
        )
        .bind(user.id.as_str())
        .bind(project.id.as_str())
        .bind(role)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn has_role(&self, user_id: &str, project_id: &str) -> Result<bool> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM role_assignments WHERE user_id = $1 AND project_id = $2",
        )
        .bind(user_id)
        .bind(project_id)
        .fetch_one(&self.pool)
        .await?;
        Ok(n > 0)
    }

    /// Creates an AK/SK key for `user` acting in `project` (the user gets a role there).
    pub async fn create_key(&self, user: &User, project: &Project) -> Result<AccessKey> {
        self.grant_role(user, project, "admin").await?;
        let ak = random_string(20, UPPER_ALNUM);
        let sk = random_string(40, ALNUM);
        sqlx::query(
            "INSERT INTO access_keys (access_key, secret_key, user_id, project_id, created_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&ak)
        .bind(&sk)
        .bind(user.id.as_str())
        .bind(project.id.as_str())
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(AccessKey {
            access_key: ak,
            secret_key: Some(sk),
            user_id: user.id.clone(),
            project_id: project.id.clone(),
        })
    }

    pub async fn list_keys(&self) -> Result<Vec<AccessKey>> {
        let rows = sqlx::query(
            "SELECT access_key, user_id, project_id FROM access_keys ORDER BY created_at",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| AccessKey {
                access_key: r.s("access_key"),
                secret_key: None,
                user_id: UserId(r.s("user_id")),
                project_id: ProjectId(r.s("project_id")),
            })
            .collect())
    }

    pub async fn delete_key(&self, ak: &str) -> Result<bool> {
        let r = sqlx::query("DELETE FROM access_keys WHERE access_key = $1")
            .bind(ak)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    async fn caller_for(&self, user_id: &str, project_id: &str) -> Result<Option<Caller>> {
        let row = sqlx::query(
            "SELECT u.id AS user_id, u.name AS user_name, u.domain_id AS domain_id, \
             p.id AS project_id, p.name AS project_name \
             FROM users u, projects p WHERE u.id = $1 AND p.id = $2",
        )
        .bind(user_id)
        .bind(project_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| Caller {
            user_id: UserId(r.s("user_id")),
            user_name: r.s("user_name"),
            domain_id: DomainId(r.s("domain_id")),
            project_id: ProjectId(r.s("project_id")),
            project_name: r.s("project_name"),
        }))
    }

    /// The key's secret and whom it acts for, if the key exists.
    pub async fn lookup_key(&self, ak: &str) -> Result<Option<KeyGrant>> {
        let row = sqlx::query(
            "SELECT secret_key, user_id, project_id FROM access_keys WHERE access_key = $1",
        )
        .bind(ak)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let caller = self
            .caller_for(&row.s("user_id"), &row.s("project_id"))
            .await?;
        Ok(caller.map(|caller| KeyGrant {
            secret_key: row.s("secret_key"),
            caller,
        }))
    }

    /// Password authentication with a project scope; `None` when anything does not match.
    pub async fn authenticate(
        &self,
        user: &str,
        user_domain: &str,
        password: &str,
        project: &str,
        project_domain: Option<&str>,
    ) -> Result<Option<Caller>> {
        let Ok(domain) = self.find_domain(user_domain).await else {
            return Ok(None);
        };
        let row = sqlx::query(
            "SELECT id, password_hash FROM users WHERE domain_id = $1 AND (name = $2 OR id = $2)",
        )
        .bind(domain.id.as_str())
        .bind(user)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let Some(hash) = row.os("password_hash") else {
            return Ok(None);
        };
        let ok = PasswordHash::new(&hash)
            .map(|h| {
                Argon2::default()
                    .verify_password(password.as_bytes(), &h)
                    .is_ok()
            })
            .unwrap_or(false);
        if !ok {
            return Ok(None);
        }
        let pdomain = match project_domain {
            Some(d) => match self.find_domain(d).await {
                Ok(d) => Some(d),
                Err(_) => return Ok(None),
            },
            None => None,
        };
        let project = if is_hex_id(project) {
            self.project_by_id(project).await?
        } else {
            self.find_project(project, pdomain.as_ref().or(Some(&domain)))
                .await
                .ok()
        };
        let Some(project) = project else {
            return Ok(None);
        };
        let user_id = row.s("id");
        if !self.has_role(&user_id, project.id.as_str()).await? {
            return Ok(None);
        }
        self.caller_for(&user_id, project.id.as_str()).await
    }

    /// Issues a token for `caller`, valid `ttl_secs`.
    pub async fn issue_token(&self, caller: &Caller, ttl_secs: i64) -> Result<IssuedToken> {
        let token = format!("oims{}", random_string(60, ALNUM));
        let issued_at = now_ms();
        let expires_at = issued_at + ttl_secs * 1000;
        sqlx::query(
            "INSERT INTO tokens (token_hash, user_id, project_id, issued_at, expires_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(sha256_hex(&token))
        .bind(caller.user_id.as_str())
        .bind(caller.project_id.as_str())
        .bind(issued_at)
        .bind(expires_at)
        .execute(&self.pool)
        .await?;
        Ok(IssuedToken {
            token,
            issued_at,
            expires_at,
            caller: caller.clone(),
        })
    }

    /// The caller a valid, unexpired token stands for.
    pub async fn validate_token(&self, token: &str) -> Result<Option<(Caller, i64, i64)>> {
        let row = sqlx::query(
            "SELECT user_id, project_id, issued_at, expires_at FROM tokens WHERE token_hash = $1",
        )
        .bind(sha256_hex(token))
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        if row.i("expires_at") < now_ms() {
            return Ok(None);
        }
        let caller = self
            .caller_for(&row.s("user_id"), &row.s("project_id"))
            .await?;
        Ok(caller.map(|c| (c, row.i("issued_at"), row.i("expires_at"))))
    }

    /// Revokes a token (DELETE /v3/auth/tokens).
    pub async fn revoke_token(&self, token: &str) -> Result<bool> {
        let r = sqlx::query("DELETE FROM tokens WHERE token_hash = $1")
            .bind(sha256_hex(token))
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    /// First start: creates domain `default`, project `default`, user `admin` with a random
    /// password and a key. Returns what was created, or `None` if identities already exist.
    pub async fn bootstrap(&self) -> Result<Option<Bootstrap>> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM domains")
            .fetch_one(&self.pool)
            .await?;
        if n > 0 {
            return Ok(None);
        }
        let domain = self.create_domain("default").await?;
        let project = self.create_project(&domain, "default").await?;
        let password = random_password();
        let user = self.create_user(&domain, "admin", Some(&password)).await?;
        let key = self.create_key(&user, &project).await?;
        Ok(Some(Bootstrap {
            domain,
            project,
            user,
            password,
            key,
        }))
    }
}

/// What the first start created.
#[derive(Debug, Clone)]
pub struct Bootstrap {
    pub domain: Domain,
    pub project: Project,
    pub user: User,
    pub password: String,
    pub key: AccessKey,
}

fn project_from_row(r: &sqlx::any::AnyRow) -> Project {
    Project {
        id: ProjectId(r.s("id")),
        name: r.s("name"),
        domain_id: DomainId(r.s("domain_id")),
        domain_name: r.s("domain_name"),
    }
}

fn conflict_or(e: sqlx::Error, msg: String) -> CoreError {
    match &e {
        sqlx::Error::Database(d) if d.is_unique_violation() => CoreError::InvalidRequest(msg),
        _ => CoreError::Db(e),
    }
}
