"""Local deployment: the docker-compose topology as processes on 127.0.0.1 (fedmole deploy)."""
