//! TLS for PostgreSQL connections, with rustls (pure Rust: the module links no system
//! OpenSSL) and its `ring` provider. What is checked follows libpq's `sslmode`: nothing
//! for `prefer` / `require` (unless a root certificate file makes `require` check the
//! chain), the chain for `verify-ca`, the chain and the host name for `verify-full`.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime,
};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::libpq::{Roots, TlsPlan};
use crate::error::{Error, Result};

/// The TLS connector of a connection that follows `plan` (also used when TLS is off: the
/// connection's `sslmode` then never asks for it).
pub fn connector(plan: &TlsPlan) -> Result<MakeRustlsConnect> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = match &plan.roots {
        Roots::Unchecked => None,
        roots => {
            let mut store = RootCertStore::empty();
            match roots {
                Roots::File(file) => {
                    for cert in certificates(file, "sslrootcert")? {
                        store.add(cert).map_err(|e| {
                            Error::operational(format!(
                                "sslrootcert {}: a certificate cannot be used as a root: {e}",
                                file.display()
                            ))
                        })?;
                    }
                }
                _ => {
                    let found = rustls_native_certs::load_native_certs();
                    store.add_parsable_certificates(found.certs);
                    if store.is_empty() {
                        return Err(Error::operational(
                            "sslrootcert=system: the system has no trusted root certificates (install ca-certificates, or give sslrootcert=FILE)",
                        ));
                    }
                }
            }
            let mut builder =
                WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider.clone());
            if let Some(crl) = &plan.crl {
                builder = builder.with_crls(revocations(crl)?);
            }
            Some(builder.build().map_err(|e| {
                Error::operational(format!("the TLS certificate checks cannot be set up: {e}"))
            })?)
        }
    };
    let verifier = Arc::new(Verifier {
        chain,
        check_name: plan.check_name,
        provider: provider.clone(),
    });
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::operational(format!("TLS cannot be set up: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let config = match &plan.client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = certificates(cert, "sslcert")?;
            check_key_permissions(key)?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                Error::operational(format!(
                    "sslkey {}: no unencrypted private key could be read ({e})",
                    key.display()
                ))
            })?;
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                Error::operational(format!(
                    "sslcert {} and its key cannot be used: {e}",
                    cert.display()
                ))
            })?
        }
    };
    Ok(MakeRustlsConnect::new(config))
}

fn certificates(file: &Path, param: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(file)
        .and_then(|it| it.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|e| {
            Error::operational(format!(
                "{param} {}: cannot read PEM certificates: {e}",
                file.display()
            ))
        })?;
    if certs.is_empty() {
        return Err(Error::operational(format!(
            "{param} {} holds no PEM certificate",
            file.display()
        )));
    }
    Ok(certs)
}

fn revocations(file: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>> {
    CertificateRevocationListDer::pem_file_iter(file)
        .and_then(|it| it.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|e| {
            Error::operational(format!(
                "sslcrl {}: cannot read PEM revocation lists: {e}",
                file.display()
            ))
        })
}

/// libpq refuses a private key others can read: `0600` or less, or `0640` or less when
/// root owns it.
fn check_key_permissions(key: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let meta = std::fs::metadata(key).map_err(|e| {
            Error::operational(format!("sslkey {}: cannot read it: {e}", key.display()))
        })?;
        let mode = meta.permissions().mode();
        let allowed = if meta.uid() == 0 { 0o037 } else { 0o077 };
        if mode & allowed != 0 {
            return Err(Error::operational(format!(
                "sslkey {}: others can read the private key (mode {:o}): chmod 0600 it",
                key.display(),
                mode & 0o777
            )));
        }
    }
    Ok(())
}

#[derive(Debug)]
struct Verifier {
    /// The chain check, when the mode checks one.
    chain: Option<Arc<WebPkiServerVerifier>>,
    check_name: bool,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        // The name is checked last, after the chain: `verify-ca` stops before it.
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// What a failed TLS handshake means for the person connecting, from the rustls error in
/// `e`'s causes; None when TLS was not what failed.
pub fn explain(
    e: &(dyn std::error::Error + 'static),
    plan: &TlsPlan,
    host: &str,
) -> Option<String> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(tls) = c.downcast_ref::<rustls::Error>() {
            return Some(describe(tls, plan, host));
        }
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            if let Some(tls) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                return Some(describe(tls, plan, host));
            }
        }
        cause = c.source();
    }
    None
}

fn describe(e: &rustls::Error, plan: &TlsPlan, host: &str) -> String {
    let mode = plan.mode.name();
    let roots = match &plan.roots {
        Roots::File(f) => format!("the root certificates in {}", f.display()),
        Roots::System => "the system's trusted roots".to_string(),
        Roots::Unchecked => "no root certificates".to_string(),
    };
    match e {
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => format!(
            "the server's certificate is not valid for the host name {host:?} (sslmode={mode} checks the name; connect with the name the certificate was issued for)"
        ),
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
        | rustls::Error::InvalidCertificate(CertificateError::BadSignature) => format!(
            "the server's certificate was not issued by a certificate authority of {roots} (sslmode={mode})"
        ),
        rustls::Error::InvalidCertificate(CertificateError::Revoked) => format!(
            "the server's certificate is revoked by the sslcrl list (sslmode={mode})"
        ),
        rustls::Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => format!("the server's certificate has expired (sslmode={mode})"),
        other => format!("TLS with the server failed (sslmode={mode}): {other}"),
    }
}
