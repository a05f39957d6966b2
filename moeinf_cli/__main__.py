from moeinf_cli.app import main

main()
