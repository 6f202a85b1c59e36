//! The MongoDB section: where the letters are.

use secrecy::SecretString;

use super::{ConfigError, Env};

#[derive(Debug, Clone)]
pub enum MongoTarget {
    Uri(SecretString),
    Host { host: String, port: u16, username: String, password: SecretString },
}

#[derive(Debug, Clone)]
pub struct MongoConfig {
    pub target: MongoTarget,
    pub database: String,
    pub collection: String,
}

pub(super) fn read(env: &Env) -> Result<MongoConfig, ConfigError> {
    Ok(MongoConfig {
        target: target(env)?,
        database: env.string("MONGODB_BASE_NAME", "mts"),
        collection: env.string("MONGODB_COLLECTION", "letters"),
    })
}

fn target(env: &Env) -> Result<MongoTarget, ConfigError> {
    if let Some(uri) = env.optional("MONGO_LOCAL") {
        if !(uri.starts_with("mongodb://") || uri.starts_with("mongodb+srv://")) {
            return Err(ConfigError::InvalidSecret {
                var: "MONGO_LOCAL",
                expected: "a URI starting with mongodb:// or mongodb+srv://",
            });
        }
        return Ok(MongoTarget::Uri(uri.into()));
    }
    const EXPECTED: &str = "MONGO_LOCAL (a full MongoDB URI) or MONGO_NODEPORT_SVC_SERVICE_HOST, _PORT, MONGODB_USERNAME and MONGODB_PASSWORD";
    Ok(MongoTarget::Host {
        host: env.required("MONGO_NODEPORT_SVC_SERVICE_HOST", EXPECTED)?,
        port: env.parse("MONGO_NODEPORT_SVC_SERVICE_PORT", 27017, "a port number from 1 to 65535", |p: &u16| *p > 0)?,
        username: env.required("MONGODB_USERNAME", EXPECTED)?,
        password: env
            .secret("MONGODB_PASSWORD")
            .ok_or(ConfigError::Missing { var: "MONGODB_PASSWORD", expected: EXPECTED })?,
    })
}
