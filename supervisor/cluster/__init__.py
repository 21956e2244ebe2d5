"""Several supervisor processes sharing one PostgreSQL state database (contract.md, "Several machines")."""
