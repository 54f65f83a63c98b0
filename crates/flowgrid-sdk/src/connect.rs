//! How a flowgrid process connects to NATS beyond its URL: the credentials and the TLS a
//! secured nats-server asks for. Coordinators, workers, the CLI, the UI and the load-test
//! harness all take the same flags (`--nats-creds`, `--nats-user`, `--nats-tls-ca`, ...,
//! each also read from its `FLOWGRID_NATS_*` variable) and connect through
//! [`NatsOptions::connect`].
//!
//! The URL may list several servers of a cluster, comma-separated
//! (`nats://a:4222,nats://b:4222`); a `tls://` URL requires TLS, as does any TLS option.

use std::path::{Path, PathBuf};

use async_nats::{ConnectErrorKind, ConnectOptions};

use crate::error::{Error, Result};

/// Credentials and TLS for the connection to NATS. The default is none of either: plain
/// TCP unless the URL is `tls://` or the server asks for TLS, no credentials.
///
/// At most one kind of credentials: a credentials file, an NKey seed, a token, or a user
/// and password (the URL's `nats://user:password@host` form works too).
///
/// As clap arguments their ids are `nats_*`, so that they never collide with a command's
/// own arguments (`task complete TOKEN`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct NatsOptions {
    /// NATS credentials file: a user JWT and its NKey seed, as `nsc` writes them.
    #[cfg_attr(
        feature = "clap",
        arg(id = "nats_creds", long = "nats-creds", env = "FLOWGRID_NATS_CREDS", value_name = "FILE", global = true)
    )]
    pub creds: Option<PathBuf>,
    /// File holding the NKey seed (`SU...`) of a user the server lists by its public key.
    #[cfg_attr(
        feature = "clap",
        arg(id = "nats_nkey", long = "nats-nkey", env = "FLOWGRID_NATS_NKEY", value_name = "FILE", global = true)
    )]
    pub nkey: Option<PathBuf>,
    /// Token the server requires. Prefer the variable: a flag shows in the process list.
    #[cfg_attr(
        feature = "clap",
        arg(
            id = "nats_token",
            long = "nats-token",
            env = "FLOWGRID_NATS_TOKEN",
            hide_env_values = true,
            global = true
        )
    )]
    pub token: Option<String>,
    /// User name, with `--nats-password`.
    #[cfg_attr(feature = "clap", arg(id = "nats_user", long = "nats-user", env = "FLOWGRID_NATS_USER", global = true))]
    pub user: Option<String>,
    /// Password of `--nats-user`. Prefer the variable: a flag shows in the process list.
    #[cfg_attr(
        feature = "clap",
        arg(
            id = "nats_password",
            long = "nats-password",
            env = "FLOWGRID_NATS_PASSWORD",
            hide_env_values = true,
            global = true
        )
    )]
    pub password: Option<String>,
    /// PEM file of the certificate authority that signed the server's certificate (when the
    /// system's roots do not hold it). Implies TLS.
    #[cfg_attr(
        feature = "clap",
        arg(
            id = "nats_tls_ca",
            long = "nats-tls-ca",
            env = "FLOWGRID_NATS_TLS_CA",
            value_name = "FILE",
            global = true
        )
    )]
    pub tls_ca: Option<PathBuf>,
    /// PEM file of this process's client certificate, for a server that verifies clients
    /// (with `--nats-tls-key`). Implies TLS.
    #[cfg_attr(
        feature = "clap",
        arg(
            id = "nats_tls_cert",
            long = "nats-tls-cert",
            env = "FLOWGRID_NATS_TLS_CERT",
            value_name = "FILE",
            global = true
        )
    )]
    pub tls_cert: Option<PathBuf>,
    /// PEM file of the client certificate's private key.
    #[cfg_attr(
        feature = "clap",
        arg(
            id = "nats_tls_key",
            long = "nats-tls-key",
            env = "FLOWGRID_NATS_TLS_KEY",
            value_name = "FILE",
            global = true
        )
    )]
    pub tls_key: Option<PathBuf>,
    /// Require TLS (with a server certificate the system's roots trust, unless
    /// `--nats-tls-ca` names another authority).
    #[cfg_attr(feature = "clap", arg(id = "nats_tls", long = "nats-tls", env = "FLOWGRID_NATS_TLS", global = true))]
    pub tls: bool,
    /// Subject prefix of this process's reply inboxes, instead of `_INBOX`: lets the server
    /// allow a user to subscribe to its own replies only (`_INBOX_gpu.>`), not to everyone's.
    #[cfg_attr(
        feature = "clap",
        arg(
            id = "nats_inbox_prefix",
            long = "nats-inbox-prefix",
            env = "FLOWGRID_NATS_INBOX_PREFIX",
            value_name = "PREFIX",
            global = true
        )
    )]
    pub inbox_prefix: Option<String>,
}

impl NatsOptions {
    /// Connects to the server(s) at `url` as `name` (shown in the server's connection list).
    pub async fn connect(&self, url: &str, name: &str) -> Result<async_nats::Client> {
        let (options, servers) = self.options(url).await?;
        options.name(name).connect(servers).await.map_err(|source| Error::Connect { url: redact(url), source })
    }

    /// The connect options with these credentials and TLS settings, for a caller that adds
    /// its own (a name, an event callback), and the servers to connect to: those of `url`
    /// (comma-separated), each without the user and password it may carry
    /// (`nats://user:password@host`, or `nats://token@host`), which the options hold then.
    /// Reads the files named, so a missing or unreadable one is reported here, with its flag.
    pub async fn options(&self, url: &str) -> Result<(ConnectOptions, Vec<String>)> {
        let mut options = ConnectOptions::new();
        let (servers, in_url) = url_credentials(url)?;
        let flags_given = self.creds.is_some()
            || self.nkey.is_some()
            || self.token.is_some()
            || self.user.is_some()
            || self.password.is_some();
        if in_url.is_some() && flags_given {
            return Err(invalid(
                "the NATS URL carries credentials and so do --nats-* flags or FLOWGRID_NATS_* variables: give them once",
            ));
        }
        let credentials = match (self.credentials()?, in_url) {
            (credentials, None) => credentials,
            (_, Some((user, password))) => match password {
                Some(password) => Credentials::OwnedPassword { user, password },
                None => Credentials::OwnedToken(user),
            },
        };
        match credentials {
            Credentials::None => {}
            Credentials::File(path) => {
                options = options.credentials_file(path).await.map_err(|error| {
                    invalid(format!("cannot use the credentials file {} (--nats-creds): {error}", path.display()))
                })?;
            }
            Credentials::NKey(path) => {
                let seed = read("the NKey seed file", "--nats-nkey", path)?;
                let seed = seed.trim();
                if !seed.starts_with("SU") {
                    return Err(invalid(format!(
                        "{} (--nats-nkey) does not hold a user NKey seed: it must start with SU",
                        path.display()
                    )));
                }
                options = options.nkey(seed.to_owned());
            }
            Credentials::Token(token) => options = options.token(token.to_owned()),
            Credentials::OwnedToken(token) => options = options.token(token),
            Credentials::Password { user, password } => {
                options = options.user_and_password(user.to_owned(), password.to_owned());
            }
            Credentials::OwnedPassword { user, password } => options = options.user_and_password(user, password),
        }
        if let Some(ca) = &self.tls_ca {
            read("the certificate authority file", "--nats-tls-ca", ca)?;
            options = options.add_root_certificates(ca.clone());
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                read("the client certificate file", "--nats-tls-cert", cert)?;
                read("the client key file", "--nats-tls-key", key)?;
                options = options.add_client_certificate(cert.clone(), key.clone());
            }
            (None, None) => {}
            (Some(_), None) => {
                return Err(invalid("--nats-tls-cert needs --nats-tls-key (the certificate's private key)"))
            }
            (None, Some(_)) => {
                return Err(invalid("--nats-tls-key needs --nats-tls-cert (the certificate it belongs to)"))
            }
        }
        if let Some(prefix) = &self.inbox_prefix {
            if prefix.is_empty() || prefix.contains(['*', '>', ' ']) || prefix.starts_with('.') || prefix.ends_with('.')
            {
                return Err(invalid(format!(
                    "--nats-inbox-prefix {prefix:?} is not a subject prefix: give tokens without wildcards, e.g. _INBOX_gpu"
                )));
            }
            options = options.custom_inbox_prefix(prefix);
        }
        Ok((options.require_tls(self.tls_required()), servers))
    }

    /// True when any TLS option is given.
    pub fn tls_required(&self) -> bool {
        self.tls || self.tls_ca.is_some() || self.tls_cert.is_some()
    }

    /// The one kind of credentials given, or an error naming the flags that clash.
    fn credentials(&self) -> Result<Credentials<'_>> {
        let given: Vec<&str> = [
            (self.creds.is_some(), "--nats-creds"),
            (self.nkey.is_some(), "--nats-nkey"),
            (self.token.is_some(), "--nats-token"),
            (self.user.is_some(), "--nats-user"),
        ]
        .into_iter()
        .filter_map(|(set, flag)| set.then_some(flag))
        .collect();
        if given.len() > 1 {
            return Err(invalid(format!(
                "{} each give credentials: give one of them (or unset its FLOWGRID_NATS_* variable)",
                given.join(" and ")
            )));
        }
        if self.password.is_some() && self.user.is_none() {
            return Err(invalid("--nats-password needs --nats-user"));
        }
        Ok(match (&self.creds, &self.nkey, &self.token, &self.user) {
            (Some(path), ..) => Credentials::File(path),
            (_, Some(path), ..) => Credentials::NKey(path),
            (_, _, Some(token), _) => Credentials::Token(token),
            (.., Some(user)) => Credentials::Password { user, password: self.password.as_deref().unwrap_or_default() },
            _ => Credentials::None,
        })
    }
}

enum Credentials<'a> {
    None,
    File(&'a Path),
    NKey(&'a Path),
    Token(&'a str),
    Password {
        user: &'a str,
        password: &'a str,
    },
    /// Given in the URL.
    OwnedToken(String),
    OwnedPassword {
        user: String,
        password: String,
    },
}

/// The scheme async-nats takes for a server given without one.
const DEFAULT_SCHEME: &str = "nats://";

/// A user and, if given, a password, as a URL carries them (percent-decoded).
type UrlCredentials = (String, Option<String>);

/// The servers of `url` (comma-separated) without the user and password they carry, and
/// those (the same for every server that carries any). Each server is read as async-nats
/// reads it: one without a scheme is a `nats://` one, so `grid:pw@127.0.0.1:4222` carries
/// a user and a password too. A password without a user (`nats://:pw@host`) is refused:
/// async-nats would drop it.
fn url_credentials(url: &str) -> Result<(Vec<String>, Option<UrlCredentials>)> {
    let mut found: Option<UrlCredentials> = None;
    let mut servers = Vec::new();
    for server in server_list(url) {
        let server = server.as_str();
        let with_host = if server.contains("://") {
            url::Url::parse(server)
        } else {
            url::Url::parse(&format!("{DEFAULT_SCHEME}{server}"))
        };
        let with_user = match with_host.ok().filter(url::Url::has_host) {
            Some(parsed) if parsed.username().is_empty() && parsed.password().is_some() => {
                return Err(invalid(format!(
                    "the NATS server {} carries a password but no user: write nats://USER:PASSWORD@host (or a \
                     token as nats://TOKEN@host)",
                    redact(server)
                )));
            }
            Some(parsed) if !parsed.username().is_empty() => Some(parsed),
            _ => None,
        };
        let Some(mut parsed) = with_user else {
            servers.push(server.to_owned());
            continue;
        };
        let decode = |text: &str| percent_encoding::percent_decode_str(text).decode_utf8_lossy().into_owned();
        let credentials = (decode(parsed.username()), parsed.password().map(decode));
        if found.as_ref().is_some_and(|found| *found != credentials) {
            return Err(invalid("the servers of the NATS URL carry different credentials: give one user to all"));
        }
        found = Some(credentials);
        // Neither can fail on a URL with a host.
        let _ = parsed.set_username("");
        let _ = parsed.set_password(None);
        servers.push(parsed.to_string().trim_end_matches('/').to_owned());
    }
    Ok((servers, found))
}

/// The servers of a comma-separated NATS URL. A comma inside a server's user or password
/// (`nats://u:a,b@h:4222`, not percent-encoded) does not split it: the pieces after a
/// server with a scheme and no `@`, up to the first piece with an `@` and before the next
/// piece with a scheme, are part of it.
fn server_list(url: &str) -> Vec<String> {
    let pieces: Vec<&str> = url.split(',').map(str::trim).collect();
    let mut servers: Vec<String> = Vec::new();
    let mut next = 0;
    while next < pieces.len() {
        let mut server = pieces[next].to_owned();
        next += 1;
        if server.contains("://") && !server.contains('@') {
            let rest = &pieces[next..];
            let user_ends =
                rest.iter().take_while(|piece| !piece.contains("://")).position(|piece| piece.contains('@'));
            if let Some(last) = user_ends {
                for piece in &rest[..=last] {
                    server.push(',');
                    server.push_str(piece);
                }
                next += last + 1;
            }
        }
        servers.push(server);
    }
    servers
}

/// `url` with the password (or token) its servers carry replaced by `***`, to be shown in
/// messages and logs. A server that does not parse as a URL but has an `@` has all before
/// it hidden (it may be a malformed URL with a secret in it).
pub fn redact(url: &str) -> String {
    server_list(url)
        .iter()
        .map(String::as_str)
        .map(|server| match url::Url::parse(server) {
            Ok(mut parsed) if parsed.has_host() && !parsed.username().is_empty() => {
                if parsed.password().is_some() {
                    let _ = parsed.set_password(Some("***"));
                } else {
                    let _ = parsed.set_username("***");
                }
                parsed.to_string().trim_end_matches('/').to_owned()
            }
            _ => match server.rsplit_once('@') {
                Some((before, after)) => match before.split_once("://") {
                    Some((scheme, _)) => format!("{scheme}://***@{after}"),
                    None => format!("***@{after}"),
                },
                None => server.to_owned(),
            },
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// What to check when a connection failed, by how it failed.
pub(crate) fn connect_hint(kind: ConnectErrorKind) -> &'static str {
    match kind {
        ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Authentication => {
            " (the server refused the credentials: give the ones it expects with --nats-user and \
             --nats-password, --nats-token, --nats-nkey or --nats-creds, their FLOWGRID_NATS_* variables, or in \
             the URL)"
        }
        ConnectErrorKind::Tls => {
            " (TLS failed: does the server use TLS, and does --nats-tls-ca name the authority that signed \
             its certificate for this host name?)"
        }
        ConnectErrorKind::Io | ConnectErrorKind::TimedOut => " (is nats-server running there, with JetStream: `-js`?)",
        _ => "",
    }
}

fn read(what: &str, flag: &str, path: &Path) -> Result<String> {
    std::fs::read_to_string(path)
        .map_err(|error| invalid(format!("cannot read {what} {} ({flag}): {error}", path.display())))
}

fn invalid(detail: impl Into<String>) -> Error {
    Error::NatsOptions(detail.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(options: &NatsOptions) -> String {
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        match runtime.block_on(options.options("nats://127.0.0.1:4222")) {
            Ok(_) => "ok".to_owned(),
            Err(error) => error.to_string(),
        }
    }

    #[test]
    fn credentials_in_the_url_are_taken_out_of_it_and_hidden_in_messages() {
        let (servers, found) = url_credentials("nats://grid:p%40ss@127.0.0.1:4222,nats://grid:p%40ss@b:4223").unwrap();
        assert_eq!(servers, ["nats://127.0.0.1:4222", "nats://b:4223"]);
        assert_eq!(found, Some(("grid".to_owned(), Some("p@ss".to_owned()))));
        let (servers, found) = url_credentials("nats://s3cr3t@host:4222").unwrap();
        assert_eq!((servers, found), (vec!["nats://host:4222".to_owned()], Some(("s3cr3t".to_owned(), None))));
        let (servers, found) = url_credentials("127.0.0.1:4222, nats://a:4222").unwrap();
        assert_eq!((servers, found), (vec!["127.0.0.1:4222".to_owned(), "nats://a:4222".to_owned()], None));
        assert!(url_credentials("nats://a:1@h,nats://b:2@h").is_err(), "two users");
        let (servers, found) = url_credentials("nats://grid:2024,Se,CrEt@h:4222,nats://h2:4222").unwrap();
        assert_eq!(servers, ["nats://h:4222", "nats://h2:4222"], "a comma in a password splits no server");
        assert_eq!(found, Some(("grid".to_owned(), Some("2024,Se,CrEt".to_owned()))));
        assert_eq!(redact("nats://grid:pw@127.0.0.1:4222"), "nats://grid:***@127.0.0.1:4222");
        assert_eq!(redact("nats://tok@h:4222,nats://h2"), "nats://***@h:4222,nats://h2");
        assert_eq!(redact("127.0.0.1:4222"), "127.0.0.1:4222");
        assert_eq!(redact("nats://grid:SeCrEt@127.0.0.1:99999"), "nats://***@127.0.0.1:99999");
        assert_eq!(redact("nats://:Hunter3@h:4222"), "nats://***@h:4222");
        assert_eq!(redact("grid:SeCrEt@h:1"), "***@h:1");
        // Commas in a password that is not percent-encoded hide none of it.
        for url in ["nats://grid:Se,CrEt@h:4222,nats://h2:4222", "nats://grid:2024,Se,CrEt@h:4222,nats://h2:4222"] {
            let redacted = redact(url);
            assert!(!redacted.contains("Se") && !redacted.contains("CrEt") && !redacted.contains("2024"), "{redacted}");
            assert!(redacted.ends_with("@h:4222,nats://h2:4222"), "{redacted}");
        }
        assert_eq!(redact("nats://h1:4222,h2:4222"), "nats://h1:4222,h2:4222", "servers without credentials");
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        for twice in [
            NatsOptions { user: Some("u".into()), ..NatsOptions::default() },
            NatsOptions { password: Some("p".into()), ..NatsOptions::default() },
        ] {
            let error = runtime.block_on(twice.options("nats://grid:pw@h:4222")).err().unwrap().to_string();
            assert!(error.contains("give them once") && !error.contains("pw"), "{error}");
        }
    }

    #[test]
    fn credentials_of_a_server_without_a_scheme_are_taken_as_async_nats_reads_it() {
        let (servers, found) = url_credentials("grid:p%40ss@127.0.0.1:4222").unwrap();
        assert_eq!(servers, ["nats://127.0.0.1:4222"]);
        assert_eq!(found, Some(("grid".to_owned(), Some("p@ss".to_owned()))));
        let (servers, found) = url_credentials("s3cr3t@h:4222").unwrap();
        assert_eq!((servers, found), (vec!["nats://h:4222".to_owned()], Some(("s3cr3t".to_owned(), None))));
        let (servers, found) = url_credentials("grid:pw@a:4222,nats://grid:pw@b:4222").unwrap();
        assert_eq!(servers, ["nats://a:4222", "nats://b:4222"]);
        assert_eq!(found, Some(("grid".to_owned(), Some("pw".to_owned()))));
        assert!(url_credentials("grid:pw@a:4222,nats://other:pw@b:4222").is_err(), "two users");
        // The given credentials are the connection's, as those of a URL with a scheme.
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let (_, servers) = runtime.block_on(NatsOptions::default().options("grid:pw@h:4222")).unwrap();
        assert_eq!(servers, ["nats://h:4222"]);
        for (url, twice) in [
            ("grid:pw@h:4222", NatsOptions { user: Some("u".into()), ..NatsOptions::default() }),
            ("s3cr3t@h:4222", NatsOptions { token: Some("t".into()), ..NatsOptions::default() }),
        ] {
            let error = runtime.block_on(twice.options(url)).err().unwrap().to_string();
            assert!(error.contains("give them once") && !error.contains("pw") && !error.contains("s3cr3t"), "{error}");
        }
    }

    #[test]
    fn a_password_without_a_user_in_the_url_is_refused_saying_how_to_write_it() {
        for url in ["nats://:Hunter3@h:4222", ":Hunter3@h:4222", "nats://a:4222,nats://:Hunter3@h:4222"] {
            let error = url_credentials(url).err().unwrap().to_string();
            assert!(error.contains("a password but no user") && error.contains("nats://USER:PASSWORD@host"), "{error}");
            assert!(!error.contains("Hunter3"), "{error}");
        }
    }

    #[test]
    fn no_options_connect_in_the_clear_without_credentials() {
        assert_eq!(message(&NatsOptions::default()), "ok");
        assert!(!NatsOptions::default().tls_required());
    }

    #[test]
    fn two_kinds_of_credentials_are_refused_naming_both() {
        let options = NatsOptions { token: Some("t".into()), user: Some("u".into()), ..NatsOptions::default() };
        let error = message(&options);
        assert!(error.contains("--nats-token and --nats-user each give credentials"), "{error}");
    }

    #[test]
    fn a_password_needs_a_user_and_a_certificate_its_key() {
        let options = NatsOptions { password: Some("p".into()), ..NatsOptions::default() };
        assert!(message(&options).contains("--nats-password needs --nats-user"));
        let options = NatsOptions { tls_cert: Some("cert.pem".into()), ..NatsOptions::default() };
        assert!(message(&options).contains("--nats-tls-cert needs --nats-tls-key"));
        let options = NatsOptions { tls_key: Some("key.pem".into()), ..NatsOptions::default() };
        assert!(message(&options).contains("--nats-tls-key needs --nats-tls-cert"));
    }

    #[test]
    fn missing_files_are_named_with_their_flag() {
        for (options, flag) in [
            (NatsOptions { creds: Some("/nonexistent/a.creds".into()), ..NatsOptions::default() }, "--nats-creds"),
            (NatsOptions { nkey: Some("/nonexistent/a.nk".into()), ..NatsOptions::default() }, "--nats-nkey"),
            (NatsOptions { tls_ca: Some("/nonexistent/ca.pem".into()), ..NatsOptions::default() }, "--nats-tls-ca"),
        ] {
            let error = message(&options);
            assert!(error.contains("/nonexistent/") && error.contains(flag), "{flag}: {error}");
        }
    }

    #[test]
    fn an_nkey_file_must_hold_a_user_seed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("user.nk");
        std::fs::write(&path, "UDXU4RCSJNZOIQHZNWXHXORDPRTGNJAHAHFRGZNEEJCPQTT2M7NLCNF4\n").unwrap();
        let error = message(&NatsOptions { nkey: Some(path.clone()), ..NatsOptions::default() });
        assert!(error.contains("does not hold a user NKey seed"), "{error}");
        std::fs::write(&path, "SUACSSL3UAHUDXKFSNVUZRF5UHPMWZ6BFDTJ7M6USDXIEDNPPQYYYCU3VY\n").unwrap();
        assert_eq!(message(&NatsOptions { nkey: Some(path), ..NatsOptions::default() }), "ok");
    }

    #[test]
    fn an_inbox_prefix_must_be_a_plain_subject_prefix() {
        for bad in ["", "_INBOX.*", "a.>", "a b", ".a", "a."] {
            let error = message(&NatsOptions { inbox_prefix: Some(bad.into()), ..NatsOptions::default() });
            assert!(error.contains("--nats-inbox-prefix"), "{bad:?}: {error}");
        }
        assert_eq!(message(&NatsOptions { inbox_prefix: Some("_INBOX_gpu".into()), ..NatsOptions::default() }), "ok");
    }

    #[test]
    fn any_tls_option_requires_tls() {
        assert!(NatsOptions { tls: true, ..NatsOptions::default() }.tls_required());
        assert!(NatsOptions { tls_ca: Some("ca.pem".into()), ..NatsOptions::default() }.tls_required());
        assert!(NatsOptions { tls_cert: Some("c.pem".into()), ..NatsOptions::default() }.tls_required());
    }
}
