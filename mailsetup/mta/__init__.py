"""The embedded MTA: mailsetup's own SMTP server on aiosmtpd, run on the set-up's files."""
